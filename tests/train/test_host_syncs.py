"""The training hot path never makes the host wait for the device.

On CUDA, reading a device value on the host (`.item()`, `.tolist()`, `bool(t)`, `int(t)`), and
every op whose output size depends on the data (`nonzero`, boolean-mask indexing, `bincount`,
`unique`, `masked_select`, `repeat_interleave` without `output_size`) blocks the host until
the GPU has caught up, so the next kernels are not queued in time. A copy from host data into a
device tensor (`torch.tensor(...)`, `t[i] = 1.0`) blocks too. None of this shows on CPU, where
every value is already on the host, so these tests watch for the operations themselves: a
`TorchDispatchMode` sees every aten op, forward and backward (CPU autograd runs on the calling
thread), and the Python-level reads (`Tensor.tolist` and friends, some of which never reach
the dispatcher on CPU) are patched on `torch.Tensor` for the duration. The checker is first
shown to catch each kind of sync, so a passing hot path means something.

Watched: the attention mask (dense, the CPU twin of the compiled FlexAttention mask), the
per-pair losses with a precomputed and with a live reference, in shared+packed and paired
layouts, Llama and Mistral (sliding window), and the backward; then whole `train_step`s and
`evaluate`, which must read the device exactly once, after the last backward. Everything runs
eagerly (torch.compile is used on CUDA only), as it would on CUDA.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Iterator

import pytest
import torch
from conftest import DENSE, random_examples, tiny_config
from torch.utils._python_dispatch import TorchDispatchMode

import prefixdpo.kernels.log_probs as log_probs_module
import prefixdpo.kernels.reduce as reduce_module
from prefixdpo.data.loader import PreferenceLoader, fit_examples
from prefixdpo.model.transformer import build_model
from prefixdpo.train.distributed import Distributed
from prefixdpo.train.forward import attention_masks, pair_losses
from prefixdpo.train.losses import LossConfig, LossState
from prefixdpo.train.loop import evaluate, train_step
from prefixdpo.train.reference import LiveReference, TableReference

aten = torch.ops.aten
CPU = Distributed(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), mesh=None)

# Tensor methods that hand a value to Python: on CUDA each waits for the device.
HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__",
              "__complex__")

# Aten ops that sync on CUDA whatever their arguments.
SYNC_OPS = {
    aten._local_scalar_dense: "reads a value on the host (.item(), bool(), int(), float())",
    aten.is_nonzero: "reads a value on the host",
    aten.equal: "returns a Python bool",
    aten.nonzero: "output size depends on the data",
    aten.masked_select: "output size depends on the data",
    aten.bincount: "output size depends on the data",
    aten._unique: "output size depends on the data",
    aten._unique2: "output size depends on the data",
    aten.unique_dim: "output size depends on the data",
    aten.unique_consecutive: "output size depends on the data",
    aten.unique_dim_consecutive: "output size depends on the data",
    aten.lift_fresh: "a tensor made from host data (on CUDA, a blocking copy to the device)",
}
BOOL_INDEXED = (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_)


class HostSync(AssertionError):
    pass


def _sync_reason(func, args: tuple, kwargs: dict) -> str | None:
    packet = func.overloadpacket
    if packet in SYNC_OPS:
        return SYNC_OPS[packet]
    # Tensor repeats (static int repeats decompose into other ops before reaching here).
    if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return "repeat_interleave with tensor repeats and no output_size"
    if packet in BOOL_INDEXED:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
               for i in indices):
            return "indexing with a boolean mask (a nonzero inside)"
    return None


class _SyncWatcher(TorchDispatchMode):
    def __init__(self, events: list[str] | None):
        super().__init__()
        self.events = events

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = _sync_reason(func, args, kwargs)
        if reason is not None:
            _report(self.events, f"{func}: {reason}")
        return func(*args, **kwargs)


def _report(events: list[str] | None, what: str) -> None:
    if events is None:
        raise HostSync(f"host-device sync in the hot path: {what}")
    events.append(what)


@contextlib.contextmanager
def watch_syncs(events: list[str] | None = None) -> Iterator[None]:
    """Raise HostSync at the first syncing operation; or, given `events`, record them."""
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    # The patch is process-wide; like the dispatch mode, it watches this thread only (not,
    # for one, the loader's background thread building batches on the host).
    watched = threading.get_ident()

    def guarded(name, original):
        def read(self, *args, **kwargs):
            if threading.get_ident() == watched:
                _report(events, f"Tensor.{name}")
            return original(self, *args, **kwargs)
        return read

    for name, original in originals.items():
        setattr(torch.Tensor, name, guarded(name, original))
    try:
        with _SyncWatcher(events):
            yield
    finally:
        for name in HOST_READS:
            delattr(torch.Tensor, name)  # back to torch._C.TensorBase's
    assert all(getattr(torch.Tensor, n) is originals[n] for n in HOST_READS)


# ---- the checker catches each kind of sync -----------------------------------------------------

def _data() -> torch.Tensor:
    return torch.tensor([3.0, -1.0, 2.0, 0.0])


@pytest.mark.parametrize("name,operation", [
    ("item", lambda t: t[0].item()),
    ("tolist", lambda t: t.tolist()),
    ("bool of any", lambda t: bool((t > 2).any())),
    ("if on a tensor", lambda t: 1 if t.sum() > 0 else 0),
    ("int", lambda t: int(t.sum())),
    ("float", lambda t: float(t.max())),
    ("numpy", lambda t: t.numpy()),
    ("cpu", lambda t: t.cpu()),
    ("range of a tensor", lambda t: range(t.long()[0])),
    ("bincount", lambda t: torch.bincount(t.long().clamp(min=0))),
    ("boolean mask indexing", lambda t: t[t > 0]),
    ("boolean mask assignment", lambda t: t.clone().__setitem__(t > 0, 0.0)),
    ("masked_select", lambda t: t.masked_select(t > 0)),
    ("nonzero", lambda t: t.nonzero()),
    ("unique", lambda t: torch.unique(t)),
    ("repeat_interleave", lambda t: torch.repeat_interleave(t, t.long().clamp(min=0))),
    ("equal", lambda t: torch.equal(t, t)),
    ("tensor from host data", lambda t: t + torch.tensor([1.0, 2.0, 3.0, 4.0])),
    ("assigning a Python number", lambda t: t.clone().__setitem__(0, 5.0)),
])
def test_the_checker_catches(name, operation):
    t = _data()
    with pytest.raises(HostSync):
        with watch_syncs():
            operation(t)
    # ... and only while watching.
    operation(t)


def test_the_checker_sees_backward():
    class ReadsInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            grad.sum().item()
            return grad * 2

    x = torch.ones(3, requires_grad=True)
    with watch_syncs():
        y = ReadsInBackward.apply(x).sum()
    with pytest.raises(HostSync, match="local_scalar_dense|Tensor.item"):
        with watch_syncs():
            y.backward()


def test_the_checker_allows_what_does_not_sync():
    t = _data()
    with watch_syncs():
        t[torch.arange(2) * 2]                          # integer indexing
        torch.where(t > 0, t, 0.0)                      # masks as values, not as indices
        torch.repeat_interleave(t, 2)                   # static repeats
        torch.repeat_interleave(t, t.long().clamp(min=0), output_size=5)
        t.nonzero_static(size=4)
        torch._assert_async((t < 10).all(), "checked on the device")
        torch.full((1,), 1.0) + t.sum()
        t.shape[0] + t.numel()                          # metadata


def test_the_guard_is_removed():
    with contextlib.suppress(HostSync):
        with watch_syncs():
            raise HostSync("left early")
    assert torch.Tensor.tolist is torch._C.TensorBase.tolist
    assert _data().tolist() == [3.0, -1.0, 2.0, 0.0]


# ---- the hot path --------------------------------------------------------------------------

@pytest.fixture
def as_on_cuda(monkeypatch):
    """The kernels' value checks as they run on CUDA: device-side asserts. On CPU they read
    the values on the host instead (free there, and it gives a ValueError naming the entry);
    `test_the_kernels_check_values_on_the_device_off_cpu` shows the watcher would see that."""
    for module in (log_probs_module, reduce_module):
        monkeypatch.setattr(module, "values_checked_on_host", lambda tensor: False)


def _config(name: str):
    if name == "mistral":
        return tiny_config(architecture="MistralForCausalLM", sliding_window=5)
    return tiny_config()


def _setup(config_name: str, layout: str, micro_batch_size: int = 4, grad_accum: int = 1,
           prefetch: int = 0):
    model = build_model(_config(config_name), seed=0)
    examples, report = fit_examples(random_examples(24, model.config.vocab_size, seed=1),
                                    "shared+packed", 128, "truncate")
    loader = PreferenceLoader(examples, layout, micro_batch_size, grad_accum,
                              packing_length=report.packing_length, pad_multiple=8, seed=0,
                              prefetch=prefetch)
    generator = torch.Generator().manual_seed(0)
    table = -20.0 * torch.rand(loader.numbering.num_sequences, generator=generator)
    return model, loader, table


def _reference(kind: str, model, table):
    if kind == "table":
        return TableReference(table)
    frozen = copy.deepcopy(model).requires_grad_(False).eval()
    return LiveReference(frozen)


@pytest.mark.parametrize("config_name", ["llama", "mistral"])
@pytest.mark.parametrize("layout", ["shared+packed", "paired"])
@pytest.mark.parametrize("reference_kind", ["table", "live"])
def test_forward_and_backward_do_not_sync(as_on_cuda, config_name, layout, reference_kind):
    model, loader, table = _setup(config_name, layout)
    reference = _reference(reference_kind, model, table)
    batch = next(iter(loader))[0]
    assert batch.num_pairs > 0
    with watch_syncs():
        masks = attention_masks(batch, model.config, executor=DENSE)
        losses, metrics, _ = pair_losses(model, batch, reference, LossConfig(), LossState(),
                                         executor=DENSE)
        losses.sum().backward()
    assert all(mask.shape[-1] == batch.input_ids.shape[1] for mask in masks.by_window.values())
    assert losses.shape == (batch.num_pairs,) and torch.isfinite(losses).all()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("loss_type", ["ipo", "bco_pair", "aot", "simpo", "sft",
                                       "sigmoid_norm"])
def test_losses_do_not_sync(as_on_cuda, loss_type):
    """Length-normalized (token counts from the batch), batch-statistic and reference-free
    losses, with the NLL term."""
    model, loader, table = _setup("llama", "shared+packed")
    batch = next(iter(loader))[0]
    state = LossState()
    config = LossConfig(type=loss_type, rpo_alpha=0.5, bco_running_mean=True)
    with watch_syncs():
        for _ in range(2):  # bco_pair: a second call reads the state the first one left
            losses, _, state = pair_losses(model, batch, TableReference(table), config, state,
                                           executor=DENSE)
            losses.sum().backward()


@pytest.mark.parametrize("reference_kind", ["table", "live"])
def test_ld_alpha_weighting_and_f_divergence_do_not_sync(as_on_cuda, reference_kind):
    """LD-DPO's shared prefixes (a sort and a running sum on the device), WPO's token
    statistics from the head, an f-divergence; ranked groups (a sequence in several pairs)."""
    model, loader, table = _setup("llama", "shared+packed")
    shared = -5.0 * torch.rand(loader.numbering.num_pairs, 2,
                               generator=torch.Generator().manual_seed(1))
    reference = TableReference(table, shared) if reference_kind == "table" else \
        _reference("live", model, table)
    batch = next(iter(loader))[0]
    config = LossConfig(type=("sigmoid", "sft"), ld_alpha=0.5, use_weighting=True,
                        f_divergence_type="js_divergence", rpo_alpha=0.5)
    with watch_syncs():
        losses, _, _ = pair_losses(model, batch, reference, config, LossState(),
                                   executor=DENSE)
        losses.sum().backward()
    assert torch.isfinite(losses).all()


def test_a_train_step_reads_the_device_once(as_on_cuda):
    """Three micro-batches, gradient clipping and the update: one `.tolist()` after the last
    backward, whatever the number of micro-batches. (SGD: AdamW's CPU step counter is read
    on the host, which is not a device sync on CUDA either.)"""
    model, loader, table = _setup("mistral", "shared+packed", micro_batch_size=2, grad_accum=3)
    step = next(iter(loader))
    assert len(step) == 3 and step.num_pairs > 0
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    events: list[str] = []
    with watch_syncs(events):
        result, _ = train_step(model, step, reference=TableReference(table),
                               loss_config=LossConfig(), loss_state=LossState(),
                               optimizer=optimizer, max_grad_norm=1.0, env=CPU, executor=DENSE)
    assert events == ["Tensor.tolist"]
    assert result.finite and result.num_pairs == step.num_pairs


def test_evaluate_reads_the_device_once(as_on_cuda):
    """Batches are built on the host in the loader's thread (as in training), the rest is
    watched."""
    model, loader, table = _setup("llama", "paired", prefetch=2)
    assert len(list(loader.one_pass())) > 1
    events: list[str] = []
    with watch_syncs(events):
        metrics = evaluate(model, loader, reference=TableReference(table),
                           loss_config=LossConfig(), loss_state=LossState(), env=CPU,
                           executor=DENSE)
    assert events == ["Tensor.tolist"]
    assert metrics["eval/loss"] > 0


def test_the_kernels_check_values_on_the_device_off_cpu():
    """Without `as_on_cuda`, the kernels' CPU checks read targets and indices on the host, and
    the watcher says so: the choice of check is what keeps CUDA free of them."""
    model, loader, table = _setup("llama", "shared+packed")
    batch = next(iter(loader))[0]
    with pytest.raises(HostSync, match="local_scalar_dense|Tensor.__bool__"):
        with watch_syncs():
            pair_losses(model, batch, TableReference(table), LossConfig(), LossState(),
                        executor=DENSE)
