"""The drafter training loop: self-distillation through the drafter's own recurrence.

A training sample is an anchor position t of a teacher sequence (ids c, target predictions y, hidden h, K/V):
at inference the drafter would start a round there with the target cache holding positions 0..t, the last seen
token c[t+1] at query position t+1 and the target's hidden state h[t]. Step d (1..D) predicts y[t+d], the
target's own next token, feeding step d+1 its projected hidden state and the embedding of y[t+d] (the draft
that verification would have accepted). Step d's label is only valid while the corpus follows the target's
greedy path (c[t+j+1] == y[t+j] for j < d) and lies in the drafter's vocabulary; other samples are masked.

Held-out acceptance: on the eval split, the drafter's greedy chain is right for a leading run of steps; its
mean length + 1 is the mean accepted length a round of D drafts would get.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..cache import AttentionView
from .teacher import load_shards

EVAL_SEQS_DURING_TRAINING = 48


def assistant_config_dict(target_model, kv_layers: dict[str, int], args, vocab_size_kept: int) -> dict:
    """An assistant config for a Gemma 3 / Gemma 4 target: one layer per read attention kind, RoPE of the target."""
    tcfg = target_model.config
    specs = target_model.cache_specs()
    kinds = ["sliding_attention", "full_attention"] if "sliding_attention" in kv_layers else ["full_attention"]
    layer_types = [kinds[i % len(kinds)] for i in range(args.layers)]
    layer_types[-1] = "full_attention"
    full = specs[kv_layers["full_attention"]]
    sliding = specs[kv_layers["sliding_attention"]] if "sliding_attention" in kv_layers else full
    if getattr(tcfg, "model_type", "") == "gemma3_text":
        rope = {"sliding_attention": {"rope_type": "default", "rope_theta": tcfg.rope_local_base_freq},
                "full_attention": {"rope_type": "default", "rope_theta": tcfg.rope_theta}}
        if tcfg.rope_scaling_factor != 1.0:
            rope["full_attention"] = {"rope_type": "linear", "factor": tcfg.rope_scaling_factor, "rope_theta": tcfg.rope_theta}
    else:
        rope = {k: dict(v) for k, v in tcfg.rope_parameters.items()}
    text = dict(
        model_type="gemma4_text", vocab_size=tcfg.vocab_size, hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size, num_hidden_layers=args.layers,
        num_attention_heads=max(1, (args.hidden_size * 2) // sliding.k_dim) * sliding.n_kv_heads,
        num_key_value_heads=sliding.n_kv_heads, head_dim=sliding.k_dim, global_head_dim=full.k_dim,
        layer_types=layer_types, sliding_window=sliding.window or 4096, rope_parameters=rope,
        num_kv_shared_layers=args.layers, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6,
        max_position_embeddings=tcfg.max_position_embeddings, attention_k_eq_v=False,
        bos_token_id=tcfg.bos_token_id, eos_token_id=list(tcfg.eos_token_ids), pad_token_id=tcfg.pad_token_id,
    )
    if full.n_kv_heads != sliding.n_kv_heads:
        text["num_global_key_value_heads"] = full.n_kv_heads
    return dict(
        model_type="gemma4_assistant", text_config=text, backbone_hidden_size=tcfg.hidden_size,
        target_kv_layers=dict(kv_layers), gemmaspec_vocab_size=vocab_size_kept,
    )


class TeacherData:
    """Teacher shards in memory, with per-sequence tensors ready for batching."""

    def __init__(self, work: Path, split: str, vocab: torch.Tensor, full_vocab: int):
        self.seqs = []
        for shard in load_shards(work, split):
            for i in range(len(shard["ids"])):
                self.seqs.append({key: shard[key][i] for key in shard if key not in ("kinds", "layers")}
                                 | {"kind": shard["kinds"][i]})
        self.layers = None
        # token id -> index in the drafter vocabulary (-1: not in it)
        self.index = torch.full((full_vocab,), -1, dtype=torch.long)
        self.index[vocab] = torch.arange(len(vocab))

    def __len__(self) -> int:
        return len(self.seqs)

    def samples(self, seq: dict, anchors: torch.Tensor, depth: int):
        """Inputs and labels for anchors t: first tokens c[t+1], step inputs y[t+d-1], labels y[t+d] (vocab index),
        validity masks [N, D]."""
        ids, pred = seq["ids"].long(), seq["pred"].long()
        S = len(ids)
        steps = torch.arange(1, depth + 1)
        label_pos = (anchors[:, None] + steps[None, :]).clamp(max=S - 1)  # position whose prediction is the label
        labels = pred[label_pos]
        valid = (anchors[:, None] + steps[None, :]) <= S - 1
        # step d (d >= 2) needs the corpus to follow the target's greedy path: c[t+j+1] == y[t+j], j = 1..d-1
        follow = (ids[(anchors[:, None] + steps[None, :] + 1).clamp(max=S - 1)] == pred[label_pos])  # j = d
        on_path = torch.cumprod(torch.cat([torch.ones(len(anchors), 1, dtype=torch.bool), follow[:, :-1]], 1).long(), 1).bool()
        labels_idx = self.index[labels]
        valid &= on_path & (labels_idx >= 0)
        first_tokens = ids[(anchors + 1).clamp(max=S - 1)]
        step_tokens = labels  # the accepted draft of step d feeds step d+1
        return first_tokens, step_tokens, labels_idx.clamp(min=0), valid


def _views(model, seq: dict, query_pos: torch.Tensor) -> dict[str, AttentionView]:
    S = seq["ids"].shape[0]
    key_pos = torch.arange(S)
    views = {}
    for kind in model.config.layer_kinds:
        tag = "full" if kind == "full_attention" else "sliding"
        keys, values = seq[f"k_{tag}"].float(), seq[f"v_{tag}"].float()
        views[kind] = AttentionView(keys, values, model.masks(query_pos, key_pos, kind))
    return views


def chain_forward(model, target, seq, anchors, data: TeacherData, depth: int):
    """Logits over the drafter vocabulary for every anchor and step: [N, D, V'] plus labels and masks."""
    first, step_tokens, labels, valid = data.samples(seq, anchors, depth)
    query_pos = anchors + 1
    views = _views(model, seq, query_pos)
    rope = model.rope(query_pos)
    hidden = seq["hidden"][anchors].float()
    token_emb = target.embed(first)
    logits = []
    for d in range(depth):
        h = model(torch.cat([token_emb, hidden], dim=-1), rope, views)
        logits.append(model.vocab_logits(h))
        hidden = model.project(h)
        token_emb = target.embed(step_tokens[:, d])
    return torch.stack(logits, 1), labels, valid


@torch.no_grad()
def evaluate(model, target, data: TeacherData, depth: int, anchors_per_seq: int = 64, max_seqs: int = 0) -> dict:
    """Per-step accuracy and the mean accepted length of a D-token greedy draft on held-out sequences
    (`max_seqs`: an evenly spaced subset of them, for the progress bar)."""
    g = torch.Generator().manual_seed(1234)
    correct = torch.zeros(depth)
    counted = torch.zeros(depth)
    run_lengths = []
    by_kind: dict[str, list[float]] = {}
    seqs = data.seqs
    if max_seqs and len(seqs) > max_seqs:
        seqs = [seqs[i * len(seqs) // max_seqs] for i in range(max_seqs)]
    for seq in seqs:
        S = seq["ids"].shape[0]
        anchors = torch.randperm(S - 2, generator=g)[:anchors_per_seq]
        logits, labels, valid = chain_forward(model, target, seq, anchors, data, depth)
        right = (logits.argmax(-1) == labels) & valid
        correct += right.sum(0)
        counted += valid.sum(0)
        # a round accepts the leading run of right drafts (only rounds whose first step is valid count)
        ok = valid[:, 0]
        run = torch.cumprod(right.long(), 1).sum(1)[ok].float()
        run_lengths.append(run)
        by_kind.setdefault(seq["kind"], []).extend((run + 1).tolist())
    runs = torch.cat(run_lengths)
    return {
        "step_accuracy": [round(float(c / max(n, 1)), 3) for c, n in zip(correct, counted)],
        "mean_accepted_length": round(float(runs.mean() + 1), 3) if len(runs) else 1.0,
        "by_kind": {k: round(sum(v) / len(v), 3) for k, v in sorted(by_kind.items())},
    }


@torch.no_grad()
def warm_start(model, folder: Path, target_model) -> None:
    """Start from a trained drafter of the same shape (`--init-from`): its body as it is, its head rows for the
    tokens both vocabularies keep, and for the new tokens rows mapped from the target's embedding by the
    least-squares map (target embedding -> head row) fitted on the kept tokens."""
    from ..errors import GemmaspecError
    from ..models.assistant import load_assistant

    old = load_assistant(folder)
    if old.vocab_map is None:
        raise GemmaspecError(f"--init-from {folder}: not a drafter with a trimmed vocabulary (train-drafter's output)")
    mine = model.state_dict()
    body = {k: v for k, v in old.state_dict().items() if k not in ("lm_head", "vocab_map")}
    misfit = [k for k, v in body.items() if k not in mine or mine[k].shape != v.shape]
    if misfit or old.lm_head.shape[1] != model.lm_head.shape[1]:
        raise GemmaspecError(f"--init-from {folder}: its shape differs from this run's ({', '.join(misfit[:3]) or 'lm_head'})")
    model.load_state_dict(body, strict=False)
    old_row = {int(t): i for i, t in enumerate(old.vocab_map.tolist())}
    kept = [(i, old_row[int(t)]) for i, t in enumerate(model.vocab_map.tolist()) if int(t) in old_row]
    new = [i for i, t in enumerate(model.vocab_map.tolist()) if int(t) not in old_row]
    embed = target_model.embed_tokens.detach().float()
    mine_idx = torch.tensor([i for i, _ in kept], dtype=torch.long)
    old_idx = torch.tensor([j for _, j in kept], dtype=torch.long)
    model.lm_head[mine_idx] = old.lm_head[old_idx].float()
    if new:
        new_idx = torch.tensor(new, dtype=torch.long)
        fit = torch.linalg.lstsq(embed[model.vocab_map[mine_idx]].double(), old.lm_head[old_idx].double()).solution
        model.lm_head[new_idx] = (embed[model.vocab_map[new_idx]].double() @ fit).float()
    print(f"initialised from {folder}: {len(kept)} head rows kept, {len(new)} new", file=sys.stderr)


def train_drafter(target, work: Path, out: Path, vocab: torch.Tensor, args) -> None:
    from tqdm import tqdm

    from ..models.assistant import AssistantConfig, AssistantModel, save_assistant
    from .teacher import read_layers

    torch.manual_seed(args.seed)
    tmodel = target.model
    for p in tmodel.parameters():
        p.requires_grad_(False)
    kv_layers = read_layers(tmodel)
    cfg_dict = assistant_config_dict(tmodel, kv_layers, args, len(vocab))
    cfg_dict["gemmaspec_target"] = target.name
    model = AssistantModel(AssistantConfig.from_hf(cfg_dict))
    model.init_trainable(vocab, tmodel)
    train = TeacherData(work, "train", vocab, tmodel.config.vocab_size)
    held_out = TeacherData(work, "eval", vocab, tmodel.config.vocab_size)
    if not len(train):
        raise RuntimeError(f"no teacher data in {work}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    ckpt_path = work / "checkpoint.pt"
    step, history = 0, []
    if ckpt_path.exists() and args.resume:
        ckpt = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        step, history = ckpt["step"], ckpt.get("history", [])
        print(f"resuming at step {step}", file=sys.stderr)
    elif getattr(args, "init_from", None):
        warm_start(model, Path(args.init_from), tmodel)

    def lr_at(s: int) -> float:
        warm = 50
        if s < warm:
            return args.lr * (s + 1) / warm
        frac = (s - warm) / max(1, args.steps - warm)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))

    def save_checkpoint():
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "history": history}, tmp)
        tmp.rename(ckpt_path)

    g = torch.Generator().manual_seed(args.seed + step)
    depth = args.draft_depth
    per_seq = max(8, args.batch_positions // 2)
    last_ckpt = time.time()
    metrics = {"mean_accepted_length": float("nan")}
    bar = tqdm(total=args.steps, initial=step, desc="training drafter", unit="step", file=sys.stderr)
    model.train()
    while step < args.steps:
        loss_sum, n_valid = 0.0, 0
        opt.zero_grad(set_to_none=True)
        for _ in range(2):  # two sequences per step
            seq = train.seqs[int(torch.randint(len(train), (1,), generator=g))]
            S = seq["ids"].shape[0]
            anchors = torch.randperm(S - 2, generator=g)[:per_seq]
            logits, labels, valid = chain_forward(model, tmodel, seq, anchors, train, depth)
            weights = valid.float() * (0.8 ** torch.arange(depth, dtype=torch.float32))[None, :]
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
            loss = (ce * weights.reshape(-1)).sum() / max(1.0, float(weights.sum()))
            loss.backward()
            loss_sum += float(loss.detach())
            n_valid += int(valid.sum())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.step()
        step += 1
        if step % 100 == 0 or step == args.steps:
            model.eval()
            # a subset: evaluating all held-out sequences every 100 steps cost ~30% of the training time
            metrics = evaluate(model, tmodel, held_out, depth, max_seqs=EVAL_SEQS_DURING_TRAINING)
            model.train()
            history.append({"step": step, "loss": round(loss_sum / 2, 4), **metrics})
        bar.set_postfix(loss=f"{loss_sum / 2:.3f}", eval_mal=f"{metrics['mean_accepted_length']:.2f}")
        bar.update(1)
        if time.time() - last_ckpt > args.checkpoint_minutes * 60:
            save_checkpoint()
            last_ckpt = time.time()
    bar.close()
    save_checkpoint()
    model.eval()
    final = evaluate(model, tmodel, held_out, depth)
    # bfloat16 on disk keeps the shipped file small (the loader casts to the target's dtype).
    save_assistant(model.to(torch.bfloat16), out)
    (out / "training.json").write_text(json.dumps({"settings": {k: v for k, v in vars(args).items() if k != "func"},
                                                   "held_out": final, "history": history}, indent=2))
    print(json.dumps({"out": str(out), "held_out": final}), file=sys.stderr)
