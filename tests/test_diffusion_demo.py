"""The demo's generation part, end to end on a tiny random CLIP: it trains, scores at guidance 1
and the chosen guidance, draws the grid and returns the metrics the demo report names."""

from PIL import Image

from _diffusion_util import TINY, tiny_clip
from vlkit.demo import generation


def test_generation_part_reports_the_named_metrics_and_the_side_by_side_grid(tmp_path):
    tiny_clip(tmp_path / "clip")
    overrides = [o for o in TINY if not o.startswith("--loop.steps")] + ["--loop.steps=2"]
    metrics, section = generation.run(tmp_path, quick=True, overrides=overrides)
    for key in ("clip_score", "color_accuracy", "shape_accuracy", "attribute_accuracy", "train_seconds"):
        assert isinstance(metrics[key], float)
    for key in ("color_accuracy", "shape_accuracy", "attribute_accuracy"):
        assert 0 <= metrics[key] <= 1 and 0 <= metrics[f"{key}_guidance1"] <= 1
    assert (tmp_path / "generation" / "checkpoints" / "latest").is_file()
    grid = Image.open(tmp_path / "figures" / "generation_grid.png")
    assert grid.size == (2 * generation.SHOWN * 18 + 2, 8 * 18 + 2)  # guidance 1 | the chosen guidance, a row per prompt
    assert "figures/generation_grid.png" in section and f"guidance {generation.GUIDANCE:g}" in section
