"""Benchmark of the DPO loss: published implementations, and the cost that matters.

    python benchmarks/dpo_loss.py [--quick | --tiny] [--device cpu|cuda] [--profile] [--json OUT]

Part 1, logits -> per-token log-probs -> sigmoid DPO loss, forward and backward to the policy
logits, on the same four logits tensors (policy/reference x chosen/rejected, `[B, L, V]`
float32; (1, 65536, 16000) each on CUDA, small on CPU). Each published implementation is
written here from its math, in the shape its code takes:
- `rafailov`: Rafailov et al.'s reference code (eric-mitchell/direct-preference-optimization):
  `log_softmax` over the full logits, gather, masked sum per sequence, then `preference_loss`.
  (There the chosen and rejected inputs are concatenated before the model, so the model emits
  the logits concatenated; here each logits tensor is taken as given.)
- `trl`: TRL's `selective_log_softmax` (float32: gather the target logit, logsumexp one row of
  the batch at a time) and `dpo_loss`.
- `nemo`: NeMo-Aligner: policy logits concatenated chosen-then-rejected, per-token log-probs by
  an autograd function that saves the softmax, per-token (policy - reference) summed per
  sequence, split into halves, -logsigmoid(beta * (chosen - rejected)).
- `ours`: gather minus logsumexp per token, `kernels.sequence_log_probs`, then
  `train.losses.preference_loss`.
Their losses and gradients are checked against each other before timing.

Part 2, hidden states -> loss (lm_head, log-probs, per-sequence sums, sigmoid loss; forward
AND backward to hidden and head weight): logits materialized (`reference_linear_log_probs`)
versus the chunked kernel (`linear_log_probs`), at vocab 32,000 and 128,256.

Every measurement runs in a fresh subprocess. Peak extra memory is, on CUDA,
`max_memory_allocated` minus the allocation after the inputs exist; on CPU, the process's peak
RSS (`ru_maxrss`) minus its RSS after the inputs exist (large CPU tensors are mmapped and
returned on free, so the peak is the high-water mark of the computation). Times are medians.
`--tiny` is a rehearsal of the whole script in seconds: toy sizes, every measurement in this
process (peak memory then includes what earlier ones left), figures that mean nothing. `--json`
writes every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from measure import clock, environment, synchronize
from torch import Tensor

from prefixdpo.kernels.log_probs import (DEFAULT_CHUNK_SIZE, linear_log_probs,
                                         reference_linear_log_probs)
from prefixdpo.kernels.reduce import sequence_log_probs
from prefixdpo.train.losses import LossConfig, preference_loss

BETA = 0.1
IGNORE = -100
PART1_IMPLEMENTATIONS = ("rafailov", "trl", "nemo", "ours")
PART2_VARIANTS = ("materialized", "kernel")


# ---- part 1: four implementations of the sigmoid DPO loss from logits -----------------------

def rafailov_loss(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, chosen_labels: Tensor,
                  rejected_labels: Tensor) -> Tensor:
    def batch_logps(logits: Tensor, labels: Tensor) -> Tensor:
        labels = labels[:, 1:].clone()
        logits = logits[:, :-1, :]
        loss_mask = labels != IGNORE
        labels[~loss_mask] = 0
        per_token = torch.gather(logits.log_softmax(-1), 2, labels.unsqueeze(2)).squeeze(2)
        return (per_token * loss_mask).sum(-1)

    policy_chosen, policy_rejected = batch_logps(pc, chosen_labels), batch_logps(pr,
                                                                                 rejected_labels)
    with torch.no_grad():
        ref_chosen, ref_rejected = batch_logps(rc, chosen_labels), batch_logps(rr,
                                                                               rejected_labels)
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    return (-F.logsigmoid(BETA * logits)).mean()


def trl_loss(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, chosen_labels: Tensor,
             rejected_labels: Tensor) -> Tensor:
    def selective_log_softmax(logits: Tensor, index: Tensor) -> Tensor:
        selected = torch.gather(logits, -1, index.unsqueeze(-1)).squeeze(-1)
        # One batch row at a time, to bound the logsumexp temporary.
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return selected - lse

    def sequence_logps(logits: Tensor, labels: Tensor) -> Tensor:
        labels = labels[:, 1:].clone()
        loss_mask = labels != IGNORE
        labels[~loss_mask] = 0
        per_token = selective_log_softmax(logits[:, :-1], labels)
        per_token = per_token.masked_fill(~loss_mask, 0.0)
        return per_token.sum(-1)

    chosen, rejected = sequence_logps(pc, chosen_labels), sequence_logps(pr, rejected_labels)
    with torch.no_grad():
        ref_chosen = sequence_logps(rc, chosen_labels)
        ref_rejected = sequence_logps(rr, rejected_labels)
    logits = (chosen - rejected) - (ref_chosen - ref_rejected)
    return (-F.logsigmoid(BETA * logits)).mean()


class _SoftmaxSavingLogprob(torch.autograd.Function):
    """Per-token log-prob that saves the softmax for backward, as NeMo-Aligner's
    vocab-parallel log-prob does (on one tensor-parallel rank)."""

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor) -> Tensor:
        shifted = logits - logits.amax(-1, keepdim=True)
        exp = shifted.exp()
        sum_exp = exp.sum(-1, keepdim=True)
        log_probs = shifted.gather(-1, target.unsqueeze(-1)).squeeze(-1) - sum_exp.log(
        ).squeeze(-1)
        ctx.save_for_backward(exp.div_(sum_exp), target)
        return log_probs

    @staticmethod
    def backward(ctx, grad: Tensor):
        softmax, target = ctx.saved_tensors
        grad_logits = softmax.mul(-grad.unsqueeze(-1))
        grad_logits.scatter_add_(-1, target.unsqueeze(-1), grad.unsqueeze(-1))
        return grad_logits, None


def nemo_loss(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, chosen_labels: Tensor,
              rejected_labels: Tensor) -> Tensor:
    labels = torch.cat([chosen_labels, rejected_labels])[:, 1:]
    target = labels.clamp(min=0)
    policy_logits = torch.cat([pc, pr])                              # [2B, L, V]
    pi_logprobs = _SoftmaxSavingLogprob.apply(policy_logits[:, :-1], target)
    with torch.no_grad():
        ref_logprobs = _SoftmaxSavingLogprob.apply(torch.cat([rc, rr])[:, :-1], target)
    loss_mask = (labels > -1).float()
    rewards = ((pi_logprobs - ref_logprobs) * loss_mask).sum(-1)
    chosen_rewards, rejected_rewards = torch.split(rewards.float(), len(rewards) // 2, dim=0)
    return -F.logsigmoid(BETA * (chosen_rewards - rejected_rewards)).mean(0)


def ours_loss(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, chosen_labels: Tensor,
              rejected_labels: Tensor) -> Tensor:
    def sequence_sums(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        labels, logits = labels[:, 1:], logits[:, :-1]
        target_logit = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        token_logps = target_logit - logits.logsumexp(-1)               # [B, L - 1]
        real = labels != IGNORE
        rows, cols = real.nonzero(as_tuple=True)                         # real targets only
        return (sequence_log_probs(token_logps[rows, cols], rows, labels.shape[0]),
                real.sum(-1))

    chosen, chosen_tokens = sequence_sums(pc, chosen_labels)
    rejected, rejected_tokens = sequence_sums(pr, rejected_labels)
    with torch.no_grad():
        ref_chosen, _ = sequence_sums(rc, chosen_labels)
        ref_rejected, _ = sequence_sums(rr, rejected_labels)
    losses, _, _ = preference_loss(LossConfig(beta=BETA), chosen, rejected, ref_chosen,
                                   ref_rejected, chosen_tokens, rejected_tokens)
    return losses.sum() / losses.shape[0]


PART1 = {"rafailov": rafailov_loss, "trl": trl_loss, "nemo": nemo_loss, "ours": ours_loss}


def part1_inputs(shape: tuple[int, int, int], device: str, seed: int = 0):
    batch, length, vocab = shape
    generator = torch.Generator(device=device).manual_seed(seed)
    policy = [torch.randn(shape, generator=generator, device=device) * 2 for _ in range(2)]
    # The reference near the policy, as early in training, so the loss is not saturated.
    reference = [p + 0.01 * torch.randn(shape, generator=generator, device=device)
                 for p in policy]
    labels = []
    for _ in range(2):
        ids = torch.randint(0, vocab, (batch, length), generator=generator, device=device)
        ids[:, : length // 4] = IGNORE                                  # the prompt
        labels.append(ids)
    return [p.requires_grad_() for p in policy] + reference + labels


def part1_step(name: str, inputs: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    loss = PART1[name](*inputs)
    grads = torch.autograd.grad(loss, inputs[:2])
    return loss.detach(), list(grads)


# ---- part 2: hidden states -> loss --------------------------------------------------------

def part2_inputs(num_tokens: int, vocab: int, dim: int, dtype: torch.dtype, device: str,
                 num_pairs: int = 8, seed: int = 0):
    generator = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(num_tokens, dim, generator=generator, device=device).to(dtype)
    weight = (torch.randn(vocab, dim, generator=generator, device=device) / math.sqrt(dim)
              ).to(dtype)
    targets = torch.randint(0, vocab, (num_tokens,), generator=generator, device=device)
    # Tokens split evenly over 2 * num_pairs sequences: chosen 0..P-1, rejected P..2P-1.
    sequence_index = torch.arange(num_tokens, device=device) * (2 * num_pairs) // num_tokens
    # Tokens per sequence, known from the layout (as the trainer's batches carry them).
    sequence_tokens = torch.bincount(sequence_index, minlength=2 * num_pairs)
    # Reference log-probs near the policy's, so the loss is not saturated. On CPU computed in
    # small chunks so that this setup stays below the memory peak being measured (the process's
    # high-water mark); on CUDA the peak is reset after the setup, and the default chunk size
    # reuses the kernel compiled for the measurement.
    chunk_size = DEFAULT_CHUNK_SIZE if device == "cuda" else 64
    with torch.no_grad():
        policy_sums = sequence_log_probs(linear_log_probs(hidden, weight, targets,
                                                          chunk_size=chunk_size),
                                         sequence_index, 2 * num_pairs)
    ref = policy_sums + torch.randn(2 * num_pairs, generator=generator, device=device)
    return (hidden.requires_grad_(), weight.requires_grad_(), targets, sequence_index,
            sequence_tokens, ref, num_pairs)


def part2_step(name: str, inputs) -> tuple[Tensor, list[Tensor]]:
    hidden, weight, targets, sequence_index, num_tokens, ref, num_pairs = inputs
    log_probs = (linear_log_probs if name == "kernel" else reference_linear_log_probs)
    token_logps = log_probs(hidden, weight, targets)
    sums = sequence_log_probs(token_logps, sequence_index, 2 * num_pairs)
    chosen, rejected = slice(0, num_pairs), slice(num_pairs, 2 * num_pairs)
    losses, _, _ = preference_loss(LossConfig(beta=BETA), sums[chosen], sums[rejected],
                                   ref[chosen], ref[rejected], num_tokens[chosen],
                                   num_tokens[rejected])
    loss = losses.sum() / num_pairs
    grads = torch.autograd.grad(loss, (hidden, weight))
    return loss.detach(), list(grads)


# ---- one measurement, in its own process ----------------------------------------------------

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_worker(spec: dict) -> dict:
    device = spec["device"]
    if spec["part"] == 1:
        inputs = part1_inputs(tuple(spec["shape"]), device)
        step = lambda: part1_step(spec["name"], inputs)  # noqa: E731
    else:
        dtype = getattr(torch, spec["dtype"])
        inputs = part2_inputs(spec["tokens"], spec["vocab"], spec["dim"], dtype, device)
        step = lambda: part2_step(spec["name"], inputs)  # noqa: E731
    synchronize(torch.device(device))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    times = []
    for index in range(spec["warmup"] + spec["repeats"]):
        start = clock(torch.device(device))
        loss, grads = step()
        if index >= spec["warmup"]:
            times.append(clock(torch.device(device)) - start)
        if index == 0:
            # Values that the parent compares across implementations.
            check = {"loss": loss.item(),
                     "grad_norms": [g.double().norm().item() for g in grads],
                     "grad_sums": [g.double().sum().item() for g in grads]}
        del loss, grads
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    if spec["profile"]:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
            step()
            synchronize(torch.device(device))
        sort = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
        print(f"--- profile: {spec['label']}", flush=True)
        print(prof.key_averages().table(sort_by=sort, row_limit=12), flush=True)
    return {"median_s": statistics.median(times), "peak_bytes": peak, **check}


def measure(spec: dict, in_process: bool = False) -> dict:
    """Run one spec in a fresh interpreter (so peak memory is its own), or here."""
    if in_process:
        return run_worker(spec)
    completed = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                               capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{spec['label']} failed:\n{completed.stderr[-4000:]}")
    *printed, last = completed.stdout.strip().splitlines()
    if printed:
        print("\n".join(printed))
    return json.loads(last)


# ---- driver ---------------------------------------------------------------------------------

def check_part1_agreement(device: str, shape=(2, 128, 1000)) -> dict[str, float]:
    """Each implementation in float32 against a float64 oracle (Rafailov's formula on float64
    copies of the same logits), in process at a small size: the largest relative error of the
    loss and of the gradients w.r.t. both policy logits."""
    inputs = part1_inputs(shape, device, seed=1)
    oracle_inputs = [t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point()
                     else t for t in inputs]
    oracle_loss = rafailov_loss(*oracle_inputs)
    oracle_grads = torch.autograd.grad(oracle_loss, oracle_inputs[:2])
    errors = {}
    for name in PART1_IMPLEMENTATIONS:
        loss, grads = part1_step(name, inputs)
        error = abs(loss.item() - oracle_loss.item()) / abs(oracle_loss.item())
        for grad, ref in zip(grads, oracle_grads):
            error = max(error, ((grad.double() - ref).abs().max() / ref.abs().max()).item())
        errors[name] = error
    return errors


def _relative_spread(values: list[float]) -> float:
    scale = max(abs(v) for v in values) or 1.0
    return (max(values) - min(values)) / scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help="small sizes, under a minute on CPU")
    sizes.add_argument("--tiny", action="store_true",
                       help="rehearsal: toy sizes, in one process, figures meaningless")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables")
    parser.add_argument("--json", help="write every figure to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    cuda = args.device == "cuda"
    warmup, repeats = (0, 2) if args.quick else (0, 1) if args.tiny else (1, 3)
    if args.tiny:
        part1_shape = (1, 64, 500)
        part2_sizes = [(128, 1000, 32), (128, 4000, 32)]
    elif cuda:
        part1_shape = (1, 8192, 16000) if args.quick else (1, 65536, 16000)
        part2_sizes = [(8192, 32000, 4096), (8192, 128256, 4096)]
    else:
        part1_shape = (1, 512, 4000) if args.quick else (1, 2048, 16000)
        tokens = 1024 if args.quick else 4096
        part2_sizes = [(tokens, 32000, 256), (tokens, 128256, 256)]
    part2_dtype = "bfloat16" if cuda else "float32"
    info = environment(torch.device(args.device))
    print(f"device: {info['device']}, torch {torch.__version__}, threads {info['torch_threads']}")
    report: dict = {**info, "sizes": "tiny" if args.tiny else "quick" if args.quick else "full",
                    "warmup": warmup, "repeats": repeats}

    rows = []
    print(f"\nPart 1: sigmoid DPO from four logits tensors {part1_shape} float32")
    errors = check_part1_agreement(args.device)
    print("  float32 vs a float64 oracle at (2, 128, 1000), largest relative error of loss and "
          "gradients: " + ", ".join(f"{name} {error:.1e}" for name, error in errors.items()))
    if max(errors.values()) > 1e-4:
        raise SystemExit("part 1 implementations disagree with the float64 oracle")
    results = {}
    for name in PART1_IMPLEMENTATIONS:
        spec = dict(part=1, name=name, shape=part1_shape, device=args.device, warmup=warmup,
                    repeats=repeats, profile=args.profile, label=f"part 1 {name}")
        results[name] = measure(spec, in_process=args.tiny)
        rows.append(("1", name, "x".join(map(str, part1_shape)), results[name]))
    spread = max(_relative_spread([r["loss"] for r in results.values()]),
                 *(_relative_spread([r["grad_norms"][i] for r in results.values()])
                   for i in range(2)))
    print(f"  at {part1_shape}: relative spread of loss and gradient norms across the four "
          f"{spread:.1e} (float32 sums of ~{part1_shape[1]} token log-probs, then differences)")
    report["part1"] = {"shape": list(part1_shape), "oracle_relative_error": errors,
                       "relative_spread": spread}

    print(f"\nPart 2: hidden states -> loss, forward + backward, {part2_dtype}")
    ratios = []
    for tokens, vocab, dim in part2_sizes:
        pair = {}
        for name in PART2_VARIANTS:
            spec = dict(part=2, name=name, tokens=tokens, vocab=vocab, dim=dim,
                        dtype=part2_dtype, device=args.device, warmup=warmup, repeats=repeats,
                        profile=args.profile, label=f"part 2 {name} V={vocab}")
            pair[name] = measure(spec, in_process=args.tiny)
            rows.append(("2", name, f"N={tokens} V={vocab} D={dim}", pair[name]))
        loss_gap = _relative_spread([r["loss"] for r in pair.values()])
        grad_gap = max(_relative_spread([r["grad_norms"][i] for r in pair.values()])
                       for i in range(2))
        ratios.append((tokens, vocab, dim, pair, loss_gap, grad_gap))

    print(f"\n{'part':<5}{'variant':<14}{'size':<26}{'median ms':>12}{'peak extra MiB':>16}"
          f"{'loss':>14}")
    for part, name, size, result in rows:
        print(f"{part:<5}{name:<14}{size:<26}{result['median_s'] * 1e3:>12.1f}"
              f"{result['peak_bytes'] / 2**20:>16.1f}{result['loss']:>14.6f}")
    report["rows"] = [{"part": int(part), "variant": name, "size": size,
                       "median_ms": result["median_s"] * 1e3,
                       "peak_extra_mib": result["peak_bytes"] / 2**20, "loss": result["loss"]}
                      for part, name, size, result in rows]
    print()
    report["part2"] = {"dtype": part2_dtype, "comparisons": []}
    for tokens, vocab, dim, pair, loss_gap, grad_gap in ratios:
        ref, ours = pair["materialized"], pair["kernel"]
        # Peaks are positive in a fresh process; --tiny measures in one, where they may not be.
        memory_ratio = ours["peak_bytes"] / ref["peak_bytes"] \
            if ours["peak_bytes"] > 0 and ref["peak_bytes"] > 0 else float("nan")
        time_ratio = ours["median_s"] / ref["median_s"]
        print(f"N={tokens} V={vocab} D={dim}: kernel / materialized time "
              f"{time_ratio:.2f}x, peak memory {memory_ratio:.3f} "
              f"(1/{1 / memory_ratio:.1f}); loss gap {loss_gap:.1e}, grad-norm gap {grad_gap:.1e}")
        report["part2"]["comparisons"].append(
            {"tokens": tokens, "vocab": vocab, "dim": dim, "time_ratio": time_ratio,
             "memory_ratio": memory_ratio if math.isfinite(memory_ratio) else None,
             "loss_gap": loss_gap, "grad_norm_gap": grad_gap})
        if (tokens, vocab, dim) == (4096, 128256, 256) and not cuda:
            verdict = "yes" if memory_ratio <= 1 / 8 else "NO"
            print(f"  kernel peak <= 1/8 of materialized peak at N=4096 V=128256 D=256: "
                  f"{verdict}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
