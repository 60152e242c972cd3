"""The bench loop: every prompt timed with every drafter in the same run, interleaved prompt-major.

For each prompt, for each repeat, every contestant (our drafters, then `--peers hf`, then `--endpoint`) runs
once, the order rotating with the repeat, so machine noise lands on all of them alike. Timed numbers follow
the engine's conventions: `tokens_per_second = new_tokens / decode_seconds`, where decode time starts after
the prefill that produced the first token.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..errors import GemmaspecError
from .suite import Prompt

BASELINE = "none"
OVERALL = "all"  # summary key over every category
WARMUP_TOKENS = 16


# ---- drafter specs --------------------------------------------------------------------------------
@dataclass(frozen=True)
class DrafterSpec:
    """One entry of --drafters: `LABEL` = `DRAFTER[@K]`; K (an integer or `auto`) overrides --draft-tokens."""

    label: str
    drafter: str
    draft_tokens: int | str | None = None  # None: use --draft-tokens
    optional: bool = False  # from the default list: skipped with a note when this build lacks it


def parse_drafter_specs(text: str | None, default: str = "none,ngram,mtp") -> list[DrafterSpec]:
    """`none,ngram,ngram@4,draft:/models/small@2` -> specs; `none` (the baseline) is added first if missing."""
    from ..draft_length import parse_draft_tokens

    optional = text is None
    items = [s.strip() for s in (default if text is None else text).split(",") if s.strip()]
    specs: list[DrafterSpec] = []
    for item in items:
        drafter, k = item, None
        if "@" in item:
            head, tail = item.rsplit("@", 1)
            if not head:
                raise GemmaspecError(f"--drafters: '{item}' names no drafter before '@'")
            try:
                k = parse_draft_tokens(tail)
            except GemmaspecError:
                raise GemmaspecError(f"--drafters: '{item}': the part after '@' must be an integer or 'auto'") from None
            drafter = head
        if drafter.startswith(("hf:", "endpoint")):
            raise GemmaspecError(f"--drafters: '{item}' is a peer; use --peers hf or --endpoint URL")
        if any(s.label == item for s in specs):
            raise GemmaspecError(f"--drafters: '{item}' is listed twice")
        specs.append(DrafterSpec(item, drafter, k, optional=optional and drafter != BASELINE))
    if not any(s.label == BASELINE for s in specs):
        specs.insert(0, DrafterSpec(BASELINE, BASELINE))
    return specs


# ---- one timed generation -------------------------------------------------------------------------
@dataclass
class Sample:
    token_ids: list[int] | None  # None when the contestant cannot tell (an endpoint)
    text: str
    new_tokens: int
    first_token_seconds: float  # prefill (engine), estimated prefill (hf), time to first token (endpoint)
    decode_seconds: float
    total_seconds: float  # wall time of the whole request
    acceptance_rate: float | None = None
    mean_accepted_length: float | None = None


class Contestant(Protocol):
    label: str
    kind: str  # "engine" | "hf" | "endpoint"

    def run(self, prompt: Prompt, prompt_ids: list[int], max_new_tokens: int) -> Sample: ...


class EngineContestant:
    kind = "engine"

    def __init__(self, label: str, engine, drafter, draft_tokens):
        self.label, self.engine, self.drafter, self.draft_tokens = label, engine, drafter, draft_tokens

    def run(self, prompt: Prompt, prompt_ids: list[int], max_new_tokens: int) -> Sample:
        self.engine.drafter = self.drafter  # one loaded target, drafters swapped
        t0 = time.perf_counter()
        r = self.engine.generate(list(prompt_ids), chat=prompt.chat, max_new_tokens=max_new_tokens,
                                 temperature=0.0, draft_tokens=self.draft_tokens)
        total = time.perf_counter() - t0
        s = r.stats
        return Sample(r.token_ids, r.text, s.new_tokens, s.prefill_seconds, s.decode_seconds, total,
                      s.acceptance_rate, s.mean_accepted_length)


# ---- configuration and the loop -------------------------------------------------------------------
@dataclass
class BenchConfig:
    prompts: list[Prompt]
    drafters: list[DrafterSpec]
    max_new_tokens: int
    out: Path
    model: str = "default"
    dtype: str = "auto"
    device: str = "auto"
    weights: str = "auto"
    draft_tokens: int | str = "auto"
    repeats: int = 1
    peers: list[str] = field(default_factory=list)
    endpoint: str | None = None
    endpoint_model: str | None = None
    endpoint_timeout: float = 600.0
    command: str = ""
    progress: bool = True


@dataclass
class Outcome:
    """One (prompt, contestant) cell after all repeats."""

    prompt: Prompt
    label: str
    kind: str
    samples: list[Sample]
    matches_baseline: bool = False

    @property
    def first(self) -> Sample:
        return self.samples[0]

    @property
    def decode_seconds(self) -> float:
        return statistics.median(s.decode_seconds for s in self.samples)

    @property
    def tokens_per_second(self) -> float:
        d = self.decode_seconds
        return self.first.new_tokens / d if d > 0 else 0.0

    @property
    def first_token_seconds(self) -> float:
        return statistics.median(s.first_token_seconds for s in self.samples)

    @property
    def total_seconds(self) -> float:
        return statistics.median(s.total_seconds for s in self.samples)

    def result(self) -> dict:
        s = self.first
        return {"id": self.prompt.id, "category": self.prompt.category, "drafter": self.label,
                "new_tokens": s.new_tokens, "decode_seconds": _round(self.decode_seconds),
                "tokens_per_second": _round(self.tokens_per_second),
                "acceptance_rate": _round(s.acceptance_rate), "mean_accepted_length": _round(s.mean_accepted_length),
                "matches_baseline": bool(self.matches_baseline)}

    def detail(self) -> dict:
        total = self.total_seconds
        return dict(self.result(), kind=self.kind, chat=self.prompt.chat,
                    first_token_seconds=_round(self.first_token_seconds), total_seconds=_round(total),
                    end_to_end_tokens_per_second=_round(self.first.new_tokens / total if total > 0 else 0.0),
                    decode_seconds_per_repeat=[_round(s.decode_seconds) for s in self.samples],
                    text=self.first.text)


def _round(x):
    return None if x is None else round(float(x), 6)


def build_contestants(config: BenchConfig):
    """Load the target once, build every drafter once, add the peers. Returns (loaded, engine, contestants, notes)."""
    from ..drafters import make_drafter
    from ..engine import Engine
    from ..loading import load_model

    notes: list[str] = []
    loaded = load_model(config.model, dtype=config.dtype, device=config.device, weights=config.weights)
    notes.extend(loaded.notes)
    built: dict[str, object] = {}
    contestants: list = []
    for spec in config.drafters:
        if spec.drafter not in built:
            try:
                built[spec.drafter] = make_drafter(spec.drafter, loaded)
            except GemmaspecError as e:
                if not spec.optional:
                    raise
                notes.append(f"drafter '{spec.label}' skipped: {e}")
                continue
        k = config.draft_tokens if spec.draft_tokens is None else spec.draft_tokens
        contestants.append((spec, built[spec.drafter], k))
    engine = Engine(loaded, built[BASELINE], config.draft_tokens)
    out = [EngineContestant(spec.label, engine, drafter, k) for spec, drafter, k in contestants]
    for peer in config.peers:
        if peer != "hf":
            raise GemmaspecError(f"--peers: unknown peer '{peer}' (known: hf)")
        from .peers import hf_contestants

        out.extend(hf_contestants(loaded, engine, [s for s, _, _ in contestants], config.draft_tokens, notes))
    if config.endpoint:
        from .endpoint import EndpointContestant

        out.append(EndpointContestant(config.endpoint, config.endpoint_model, config.endpoint_timeout))
    return loaded, engine, out, notes


def run_bench(config: BenchConfig) -> dict:
    """Run the suite; write results.json, details.json, report.md and speedup.png under config.out."""
    from tqdm import tqdm

    from .report import machine_info, model_label, write_plot, write_report

    if config.max_new_tokens < 1:
        raise GemmaspecError(f"--max-new-tokens must be >= 1, got {config.max_new_tokens}")
    if config.repeats < 1:
        raise GemmaspecError(f"--repeats must be >= 1, got {config.repeats}")
    if not config.prompts:
        raise GemmaspecError("no prompts to run")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)

    loaded, engine, contestants, notes = build_contestants(config)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    prompt_ids = {p.id: engine.encode_prompt(p.prompt, chat=p.chat) for p in config.prompts}

    n = len(contestants)
    total = n + len(config.prompts) * config.repeats * n
    bar = tqdm(total=total, desc="bench", unit="run", file=sys.stderr, disable=not config.progress,
               dynamic_ncols=True, mininterval=0.5)
    try:
        first = config.prompts[0]
        for c in contestants:  # warm-up: kernels, allocator, lazy imports, the server's first request
            bar.set_postfix_str(f"warm-up {c.label}", refresh=False)
            c.run(first, prompt_ids[first.id], min(config.max_new_tokens, WARMUP_TOKENS))
            bar.update()
        outcomes: list[Outcome] = []
        for p in config.prompts:
            cells = {c.label: Outcome(p, c.label, c.kind, []) for c in contestants}
            for r in range(config.repeats):
                shift = r % n
                for c in contestants[shift:] + contestants[:shift]:
                    bar.set_postfix_str(f"{p.id} {c.label}", refresh=False)
                    cells[c.label].samples.append(c.run(p, prompt_ids[p.id], config.max_new_tokens))
                    bar.update()
            _mark_matches(cells)
            outcomes.extend(cells[c.label] for c in contestants)
    finally:
        bar.close()

    machine = machine_info(loaded, engine)
    results = {
        "model": loaded.name,
        "device": engine.device.type,
        "dtype": str(engine.model.dtype).replace("torch.", ""),
        "max_new_tokens": config.max_new_tokens,
        "results": [o.result() for o in outcomes],
        "summary": summarize([o.result() for o in outcomes], [c.label for c in contestants]),
    }
    details = {"command": config.command, "machine": machine, "notes": notes, "repeats": config.repeats,
               "contestants": [{"drafter": c.label, "kind": c.kind, **getattr(c, "info", {})} for c in contestants],
               "runs": [o.detail() for o in outcomes]}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "details.json").write_text(json.dumps(details, indent=2) + "\n")
    write_report(out / "report.md", results, details)
    write_plot(out / "speedup.png", results, model_label(results, details))
    return results


def _mark_matches(cells: dict[str, Outcome]) -> None:
    """matches_baseline: every repeat's token ids equal `none`'s (text for contestants without ids)."""
    base = cells[BASELINE].first
    for cell in cells.values():
        if cell.samples[0].token_ids is None:
            cell.matches_baseline = all(s.text == base.text for s in cell.samples)
        else:
            cell.matches_baseline = all(s.token_ids == base.token_ids for s in cell.samples)


def summarize(results: list[dict], order: list[str] | None = None) -> dict:
    """{CATEGORY: {DRAFTER: {"tokens_per_second": median, "speedup": median of per-prompt ratios to none}}},
    plus OVERALL over every prompt when the results hold more than one category."""
    cats = list(dict.fromkeys(r["category"] for r in results))
    drafters = order or list(dict.fromkeys(r["drafter"] for r in results))
    base = {r["id"]: r["tokens_per_second"] for r in results if r["drafter"] == BASELINE}
    groups = cats + ([OVERALL] if len(cats) > 1 and OVERALL not in cats else [])
    summary: dict = {}
    for cat in groups:
        rows = [r for r in results if cat == OVERALL or r["category"] == cat]
        summary[cat] = {}
        for d in drafters:
            mine = [r for r in rows if r["drafter"] == d]
            if not mine:
                continue
            ratios = [r["tokens_per_second"] / base[r["id"]] for r in mine if base.get(r["id"]) and r["tokens_per_second"]]
            summary[cat][d] = {
                "tokens_per_second": _round(statistics.median(r["tokens_per_second"] for r in mine)),
                "speedup": _round(statistics.median(ratios)) if ratios else None,
            }
    return summary
