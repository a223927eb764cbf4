"""Standard dataset formats, read and written: COCO captions (Karpathy layout), VQAv2,
LLaVA conversations, RefCOCO-style referring expressions, ImageFolder with classnames and
templates, the TSV-with-base64-images layout (MMBench/MMMU/MathVista) and WebDataset tar
shards. :mod:`.shapes_export` writes the shapes world in each of them."""
