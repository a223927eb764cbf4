"""The background engine of one chat model: a thread that owns the model and runs one
:class:`~vlkit.lm.batching.DecodingBatch`. Requests that wait join it between decode steps (as
many as fit, in arrival order, as one left-padded group, images through the vision tower together,
its prompts prefilled in the next step's forward beside the running rows' tokens); a finished
answer leaves at once; a cancelled one (its client went away) is dropped at the next step. Text is
decoded here, per answer: token by token as it streams, or once, when it ends, for an answer sent
whole."""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from vlkit.lm.batching import DecodingBatch
from vlkit.lm.generate import GenerationConfig
from vlkit.lm.stopping import trim_stop_strings
from vlkit.lm.streaming import TextStream
from vlkit.text.lm_tokenizer import left_pad

log = logging.getLogger("vlkit.serve")


class Stripped:
    """A VLM's answer without the whitespace that starts and ends it (as ``vlkit chat`` shows it),
    streamed: trailing whitespace is held until more text follows."""

    def __init__(self):
        self.started, self.held = False, ""

    def push(self, piece: str) -> str:
        if not self.started:
            piece = piece.lstrip()
            self.started = bool(piece)
        body = piece.rstrip()
        if not body:
            self.held += piece
            return ""
        out, self.held = self.held + body, piece[len(body):]
        return out


@dataclass
class Job:
    """One request: ``n`` answers to one prompt, each sampled from its own generator when ``seed``
    is given (the same seed, the same answers, whatever else runs). ``deliver(event)``
    is called from the engine thread with ``("delta", index, text)``, ``("end", index,
    finish_reason, tokens)`` or ``("error", message)``; it must not block."""

    prompt: object  # vlkit.serve.models.Prompt
    config: GenerationConfig
    n: int
    deliver: Callable[[tuple], None]
    seed: int | None = None
    strip: bool = False
    stream: bool = True  # deltas as they come; else each answer's text in one delta before its end
    cancelled: bool = False
    streams: list = field(default_factory=list)
    open_rows: int = 0
    ended: int = 0  # answers ended, as counted by closes()
    key: int | None = None  # its name between processes (engine_process)

    def cancel(self) -> None:
        self.cancelled = True

    def closes(self, event: tuple) -> bool:
        """Count ``event``: True when it is the job's last (its ``n``-th end, or an error)."""
        self.ended += event[0] == "end"
        return event[0] == "error" or self.ended == self.n


class Engine:
    """Runs ``model`` (a :class:`vlkit.serve.models.ChatModel`) on a thread; :meth:`submit` queues
    a :class:`Job`. ``max_batch`` bounds the rows decoded together."""

    cpus = None  # it shares the server's process, whose CPUs are the server's to choose

    def __init__(self, model, max_batch: int = 16):
        self.model, self.max_batch = model, max_batch
        self.batch = DecodingBatch(model.lm, model.tokenizer)
        self.inbox: queue.Queue[Job] = queue.Queue()
        self.waiting: list[Job] = []
        self.jobs: dict[int, Job] = {}
        # cpu_s: the engine thread's CPU seconds (prefill_cpu_s of them admitting requests: the vision
        # tower, and the prefills a step does not pack): what a request costs the model, apart from the
        # HTTP handling around it
        self.stats = {"requests": 0, "steps": 0, "rows_stepped": 0, "max_rows": 0, "cancelled": 0, "cpu_s": 0.0,
                      "prefill_cpu_s": 0.0}  # fmt: skip
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"vlkit-engine-{model.name}", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.inbox.put(job)

    def cancel(self, job: Job) -> None:
        """Its client went away: a waiting job is dropped, a running one's rows leave at the next step."""
        job.cancel()

    def health(self) -> dict:
        joins = {f"joins_{k}": v for k, v in self.batch.joins.items()}  # how the joining groups were prefilled
        return {"running": len(self.batch), "waiting": len(self.waiting) + self.inbox.qsize(), **self.stats, **joins}

    def close(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._take(block=not self.batch and not self.waiting)
                self._drop_cancelled()
                if self.batch.rows:
                    self._deliver(self.batch.pick())  # before the next forward: an ended answer need not wait for it
                start = time.thread_time()
                self._admit()
                self.stats["prefill_cpu_s"] += time.thread_time() - start
                self._advance()
                self.stats["cpu_s"] = time.thread_time()
            except Exception as err:  # noqa: BLE001 - a failed step fails its requests, never the server
                log.exception("engine step failed")
                self._fail_all(_failure(err))

    def _take(self, block: bool) -> None:
        try:
            self.waiting.append(self.inbox.get(timeout=0.1) if block else self.inbox.get_nowait())
            while True:
                self.waiting.append(self.inbox.get_nowait())
        except queue.Empty:
            pass

    def _drop_cancelled(self) -> None:
        """Forget the requests whose clients went away: waiting ones, and running rows."""
        kept = [j for j in self.waiting if not j.cancelled]
        self.stats["cancelled"] += len(self.waiting) - len(kept)
        self.waiting = kept
        gone = [k for k in self.batch.keys if self.jobs[k[0]].cancelled]
        if gone:
            self.batch.drop(gone)
            jobs = {k[0] for k in gone}
            self.stats["cancelled"] += len(jobs)
            for job_id in jobs:
                self.jobs.pop(job_id, None)

    def _admit(self) -> None:
        """Move waiting jobs into the batch, in arrival order, while they fit."""
        group, rows = [], len(self.batch)
        for job in self.waiting:
            width = max([len(j.prompt.ids) for j in group] + [len(job.prompt.ids)])
            new = max(j.config.max_new_tokens for j in group + [job])
            alone = not group and not self.batch  # the first job always fits an empty batch
            if not alone and (rows + job.n > self.max_batch or not self.batch.fits(width, new)):
                break
            group.append(job)
            rows += job.n
        if not group:
            return
        try:
            self._prefill(group)
        except Exception as err:  # noqa: BLE001 - the group's requests fail; the running rows go on
            log.exception("prefill failed")
            self._fail(group, err)
        finally:
            self.waiting = self.waiting[len(group):]  # only now: /health counts a job in its prefill as waiting

    def _prefill(self, group: list[Job]) -> None:
        model, device = self.model, self.batch.device
        if model.vlm:
            batch = model.processor.collate([j.prompt.sample for j in group], "left")
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.inference_mode():
                embeds = model.model.inputs_embeds(batch["input_ids"], batch.get("pixel_values"), batch.get("image_sizes"))
            ids, mask = batch["input_ids"], batch["attention_mask"]
        else:
            padded = left_pad([j.prompt.ids for j in group], model.tokenizer.padding_id())
            ids, mask, embeds = padded["input_ids"].to(device), padded["attention_mask"].to(device), None
        counts = torch.tensor([j.n for j in group], device=device)
        repeat = lambda t: None if t is None else t.repeat_interleave(counts, dim=0)  # noqa: E731
        keys, configs, generators = [], [], []
        for job in group:
            self.jobs[id(job)] = job
            job.open_rows = job.n
            # per answer: a text stream (streamed) or its token ids (sent whole), and the stripper
            job.streams = [(TextStream(model.tokenizer, job.config.stops) if job.stream else [], Stripped() if job.strip else None)
                           for _ in range(job.n)]  # fmt: skip
            for i in range(job.n):
                keys.append((id(job), i))
                configs.append(job.config)
                generators.append(self._generator(job, i))
        self.batch.join(keys, configs, repeat(ids), repeat(mask), repeat(embeds), generators)
        self.stats["requests"] += len(group)

    def _generator(self, job: Job, index: int) -> torch.Generator | None:
        """Answer ``index``'s own generator, seeded from the request's seed and the index (the first
        answer from the seed itself): one shared generator would be drawn from in row order, which
        other requests' rows leaving and the request's own answers ending reorder."""
        if job.seed is None or not job.config.do_sample:
            return None
        return torch.Generator(device=self.batch.device).manual_seed((job.seed + index * _SEED_STRIDE) % 2**63)

    def _advance(self) -> None:
        """The batch's forward: the running rows' picked tokens and the joining group's prompts
        (none while the engine idles)."""
        if not self.batch:
            return
        self.batch.advance()
        if self.batch.join_error is not None:  # a joining group's prefill failed: its requests fail, the rest go on
            keys, err = self.batch.join_error
            self.batch.join_error = None
            log.error("prefill failed: %s", _failure(err))
            self._fail([self.jobs[i] for i in dict.fromkeys(k[0] for k in keys) if i in self.jobs], err)

    def _deliver(self, events: list) -> None:
        """Hand each row's new token to its job: a text delta (streamed), or the whole answer at its end."""
        self.stats["steps"] += 1
        self.stats["rows_stepped"] += len(events)
        self.stats["max_rows"] = max(self.stats["max_rows"], len(events))
        for (job_id, index), token, finish in events:
            job = self.jobs[job_id]
            text, strip = job.streams[index]
            eos = token in job.config.eos_ids
            if job.stream:
                piece = "" if eos else text.push(token)
                if finish is not None:
                    piece += text.finish()
                count = len(text.ids)
            else:  # one decode and one wake-up of the event loop per answer, not per token
                if not eos:
                    text.append(token)
                if finish is None:
                    continue
                piece = trim_stop_strings(self.model.tokenizer.decode(text, skip_special_tokens=True), job.config.stops)
                count = len(text)
            if strip is not None:
                piece = strip.push(piece)
            if piece:
                job.deliver(("delta", index, piece))
            if finish is not None:
                job.deliver(("end", index, finish, count + eos))
                job.open_rows -= 1
                if job.open_rows == 0:
                    self.jobs.pop(job_id, None)

    def _fail(self, jobs: list[Job], err: Exception) -> None:
        """``jobs`` fail with ``err``; the others go on."""
        for job in jobs:
            self.jobs.pop(id(job), None)
            job.deliver(("error", _failure(err)))

    def _fail_all(self, message: str) -> None:
        for job in {id(j): j for j in self.jobs.values()}.values():
            job.deliver(("error", message))
        self.jobs.clear()
        self.batch.drop(self.batch.keys)


_SEED_STRIDE = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: the answers of neighbouring seeds do not coincide


def _failure(err: Exception) -> str:
    """What a request that failed in the engine is told."""
    return f"generation failed ({type(err).__name__}: {err})"
