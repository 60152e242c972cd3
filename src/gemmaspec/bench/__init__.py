"""`gemmaspec bench`: time drafters side by side on a prompt suite, against plain decoding in the same run.

    suite.py     the prompt files (the shipped public suite lives in prompts/*.jsonl) and their validation
    runner.py    drafter specs (`ngram@4`), the interleaved timing loop, results.json and its summary
    peers.py     Hugging Face transformers' `generate` on the same prompts (`--peers hf`)
    endpoint.py  any OpenAI-compatible server, streamed (`--endpoint URL`)
    report.py    report.md and speedup.png
    cli.py       the `bench` sub-command

The bench is built on the engine's public API only (Engine, make_drafter, GenerationStats); it knows nothing
about how a drafter drafts or how `--draft-tokens auto` picks its length.
"""

from .runner import BenchConfig, DrafterSpec, parse_drafter_specs, run_bench, summarize
from .suite import Prompt, default_prompt_files, load_prompts

__all__ = ["BenchConfig", "DrafterSpec", "Prompt", "default_prompt_files", "load_prompts", "parse_drafter_specs",
           "run_bench", "summarize"]
