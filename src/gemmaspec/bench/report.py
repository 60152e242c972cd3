"""report.md (the table, the command, the machine) and speedup.png (grouped bars) from a bench run."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from pathlib import Path

from ..quant import parameter_count
from .runner import BASELINE, OVERALL

PLAIN = (BASELINE, "hf:none")  # contestants that never draft: no acceptance to show


# ---- machine and model ------------------------------------------------------------------------------
def machine_info(loaded, engine) -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _mem_gib(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if engine.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(engine.device)
    from .. import __version__ as version

    info["gemmaspec"] = version
    commit = _git_commit()
    if commit:
        info["gemmaspec_commit"] = commit
    model = engine.model
    info["model"] = {
        "name": loaded.name,
        "source": str(loaded.source),
        "folder": str(loaded.path),
        "type": getattr(model.config, "model_type", type(model).__name__),
        "parameters": parameter_count(model),
        "dtype": str(model.dtype).replace("torch.", ""),
        "device": engine.device.type,
        "notes": list(loaded.notes),
    }
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    return None


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


# ---- the table --------------------------------------------------------------------------------------
def table_rows(results: dict, details: dict) -> list[dict]:
    """One row per (category, drafter): the summary's numbers plus medians of the other per-prompt columns."""
    runs = details["runs"]
    rows = []
    for cat, per_drafter in results["summary"].items():
        for drafter, s in per_drafter.items():
            mine = [r for r in runs if r["drafter"] == drafter and (cat == OVERALL or r["category"] == cat)]
            rows.append({
                "category": cat, "drafter": drafter, "kind": mine[0]["kind"] if mine else "",
                "tokens_per_second": s["tokens_per_second"], "speedup": s["speedup"],
                "end_to_end": _median([r["end_to_end_tokens_per_second"] for r in mine]),
                "first_token_ms": _median([r["first_token_seconds"] * 1000 for r in mine]),
                "acceptance": _median([r["acceptance_rate"] for r in mine]),
                "mean_accepted_length": _median([r["mean_accepted_length"] for r in mine]),
                "matches": sum(r["matches_baseline"] for r in mine), "prompts": len(mine),
            })
    return rows


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _fmt(x, spec: str, suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def write_report(path: Path, results: dict, details: dict) -> None:
    rows = table_rows(results, details)
    m = details["machine"]
    kinds = {c["drafter"]: c for c in details["contestants"]}
    lines = [
        f"# gemmaspec bench: {model_label(results, details)}",
        "",
        f"{len({r['id'] for r in results['results']})} prompts, {results['max_new_tokens']} new tokens at most, "
        f"greedy (temperature 0), {details['repeats']} repeat(s) per prompt and drafter; "
        f"{results['dtype']} on {results['device']}.",
        "",
        "## Results",
        "",
        "Medians over the prompts of each category. **tok/s** = new tokens / decode seconds (the prefill, which "
        "yields the first token, is not in the decode time). **speedup** = tok/s over drafter `none` on the same "
        "prompt in the same run, then the median over prompts. **e2e tok/s** = new tokens / wall time of the "
        "whole request (prefill included). **first token** = prefill time (time to first token for `endpoint`). "
        "**accepted len** = new tokens per target forward pass during decode (1.0 for plain decoding). "
        "**matches** = prompts whose output equals `none`'s token for token.",
        "",
        "| category | drafter | tok/s | speedup | e2e tok/s | first token | acceptance | accepted len | matches |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        speed = _fmt(r["speedup"], ".2f", "x")
        if r["drafter"] != BASELINE and r["speedup"] is not None:
            speed = f"**{speed}**"
        lines.append(
            f"| {r['category']} | {r['drafter']} | {_fmt(r['tokens_per_second'], '.1f')} | {speed} | "
            f"{_fmt(r['end_to_end'], '.1f')} | {_fmt(r['first_token_ms'], '.0f', ' ms')} | "
            f"{_fmt(r['acceptance'] if r['drafter'] not in PLAIN else None, '.0%')} | "
            f"{_fmt(r['mean_accepted_length'], '.2f')} | {r['matches']}/{r['prompts']} |")
    mismatches = [r for r in results["results"] if not r["matches_baseline"]]
    lines += ["", "![speedup per category and drafter](speedup.png)", ""]
    if mismatches:
        lines += [f"**{len(mismatches)} run(s) differ from `none`**: "
                  + ", ".join(f"{r['id']} ({r['drafter']})" for r in mismatches[:20])
                  + (" ..." if len(mismatches) > 20 else ""), ""]
    else:
        lines += ["Every run's output equals plain greedy decoding (`none`) token for token.", ""]

    lines += ["## Contestants", ""]
    for label, c in kinds.items():
        if c["kind"] == "engine":
            what = "gemmaspec engine" + (" (plain decoding, the baseline)" if label == BASELINE else "")
        elif c["kind"] == "hf":
            what = f"Hugging Face transformers `generate`: {c.get('method', '')}"
        else:
            what = f"OpenAI-compatible server at {c.get('url')} serving `{c.get('served_model')}`"
            if c.get("server_drafter"):
                what += f" (drafter `{c['server_drafter']}`, as the server reports)"
        lines.append(f"- `{label}`: {what}")
    lines.append("")
    lines += ["Drafter names may carry a fixed draft length: `ngram@4` is drafter `ngram` with `--draft-tokens 4`; "
              "a name without `@K` uses the run's `--draft-tokens`.", ""]
    if any(c["kind"] == "hf" for c in kinds.values()):
        lines += ["HF timing: transformers' `generate` has no separate prefill clock, so each timed call is paired "
                  "with a 1-token `generate` of the same prompt just before it; decode seconds = full time minus "
                  "that 1-token time (the engine's convention). Its full wall time, prefill included, is the e2e "
                  "column, directly comparable with ours. HF acceptance is counted from the target's forward calls; "
                  "for assisted generation HF merges the prompt's forward with the first verification, so its "
                  "decode time is an estimate within one forward pass.", ""]
    if any(c["kind"] == "endpoint" for c in kinds.values()):
        lines += ["Endpoint timing: streamed over HTTP; first token = request sent to first text chunk; decode = "
                  "first to last text chunk; new tokens from `usage.completion_tokens` when reported, else text "
                  "chunks; acceptance from the response's `speculative` object when present. `matches` compares the "
                  "streamed text with `none`'s text.", ""]
    if details.get("notes"):
        lines += ["Notes:", ""] + [f"- {n}" for n in details["notes"]] + [""]

    lines += ["## Command", "", "```", details.get("command") or "gemmaspec bench", "```", "",
              "## Machine and model", ""]
    for key in ("cpu", "cpu_count", "memory_gib", "gpu", "platform", "python", "torch", "torch_threads",
                "transformers", "gemmaspec", "gemmaspec_commit"):
        if m.get(key) is not None:
            lines.append(f"- {key}: {m[key]}")
    for key, value in m.get("model", {}).items():
        if value not in (None, [], ""):
            lines.append(f"- model {key}: {value}")
    lines += ["", "Per-prompt numbers are in results.json (the contract) and details.json (first-token, wall "
              "time, every repeat, the generated text).", ""]
    Path(path).write_text("\n".join(lines))


# ---- the picture ------------------------------------------------------------------------------------
def model_label(results: dict, details: dict | None = None) -> str:
    """A short model name for titles: the file or folder name (the default model's GGUF file name)."""
    source = ((details or {}).get("machine") or {}).get("model", {}).get("source") or str(results["model"])
    name = Path(source).name
    return name if results["model"] != "default" else f"default ({name})"


def write_plot(path: Path, results: dict, title_model: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    cats = list(summary)
    drafters = [d for d in dict.fromkeys(d for c in cats for d in summary[c]) if d != BASELINE]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(cats) * max(1, len(drafters)) * 0.45 + 3), 4.8), dpi=120)
    if drafters:
        width = 0.8 / len(drafters)
        cmap = plt.get_cmap("tab10")
        for j, d in enumerate(drafters):
            xs = [i - 0.4 + width * (j + 0.5) for i in range(len(cats))]
            ys = [(summary[c].get(d) or {}).get("speedup") for c in cats]
            vals = [y if y is not None else 0.0 for y in ys]
            bars = ax.bar(xs, vals, width * 0.92, label=d, color=cmap(j % 10))
            for bar, y in zip(bars, ys):
                if y is not None:
                    ax.annotate(f"{y:.2f}", (bar.get_x() + bar.get_width() / 2, y), xytext=(0, 2),
                                textcoords="offset points", ha="center", va="bottom", fontsize=7)
        ax.legend(title="drafter", fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    else:
        ax.text(0.5, 0.5, "only the baseline ran", ha="center", va="center", transform=ax.transAxes)
    ax.axhline(1.0, color="black", linewidth=1, linestyle="--")
    ax.annotate("none = 1.0", (1.0, 1.0), xycoords=("axes fraction", "data"), xytext=(-4, 3),
                textcoords="offset points", ha="right", fontsize=7)
    ax.set_xticks(range(len(cats)))
    ax.set_xticklabels(cats, rotation=20 if len(cats) > 6 else 0)
    ax.set_xlabel("prompt category")
    ax.set_ylabel("speedup over plain decoding (x)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Decode speedup vs. drafter 'none' (median per prompt)\n"
                 f"{title_model or Path(str(results['model'])).name}, {results['dtype']} on {results['device']}, "
                 f"{results['max_new_tokens']} new tokens", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
