"""LM-head losses: chunked CE and token log-probs equal the full-logits formulas, in values, gradients and dtypes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from minift.losses import chunked_cross_entropy, completion_logprobs, token_logprobs

N, H, V = 37, 16, 50  # N = 37 is prime: no chunk size below it divides it


def _inputs(dtype=torch.float32, seed=0, n=N, h=H, v=V):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * 0.5).to(dtype)
    bias = torch.randn(v, generator=g).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, bias, targets


def _reference_logits(hidden, weight, bias, softcap, scale):
    """The full (N, V) logits, the way HF models compute them."""
    logits = hidden @ weight.T + bias
    if scale is not None:
        logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def _grads(fn, tensors, upstream=None, trainable=None):
    """Output of fn() and d(output * upstream)/d(tensors), with fresh leaves (frozen where trainable[i] is False)."""
    trainable = trainable or [True] * len(tensors)
    leaves = [t.detach().clone().requires_grad_(req) for t, req in zip(tensors, trainable)]
    out = fn(*leaves)
    (out * (1.0 if upstream is None else upstream)).sum().backward()
    return out.detach(), [t.grad for t in leaves]


class _CountMatmuls(TorchDispatchMode):
    """Record the input dtypes of every matrix multiply that runs inside the block."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.calls.append(tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 37, 1024])
@pytest.mark.parametrize("softcap,scale", [(None, None), (2.0, None), (None, 0.6), (1.5, 2.0)])
def test_chunked_ce_equals_full_cross_entropy(chunk_size, softcap, scale):
    # Reference: F.cross_entropy on the full logits, computed in float64 from the same fp32 inputs, so
    # that any difference beyond fp32 rounding is ours. The upstream factor 0.37 checks that backward
    # scales the gradients stored in the forward.
    hidden, weight, bias, targets = _inputs()

    def ours(h, w, b):
        return chunked_cross_entropy(h, w, targets, chunk_size=chunk_size, bias=b, softcap=softcap, scale=scale)

    def ref(h, w, b):
        return F.cross_entropy(_reference_logits(h, w, b, softcap, scale), targets, reduction="sum")

    loss, grads = _grads(ours, (hidden, weight, bias), upstream=0.37)
    ref_loss, ref_grads = _grads(ref, [t.double() for t in (hidden, weight, bias)], upstream=0.37)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=0)
    for name, g, r in zip(("hidden", "weight", "bias"), grads, ref_grads):
        assert g.dtype == torch.float32, name
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-6 * r.abs().max().item(), msg=name)


def test_chunked_ce_gradcheck_float64():
    # Finite differences against the hand-written backward, through bias, scale and softcap at once.
    hidden, weight, bias, targets = _inputs(torch.float64, n=11, h=4, v=9)
    args = [t.requires_grad_() for t in (hidden, weight, bias)]
    assert torch.autograd.gradcheck(
        lambda h, w, b: chunked_cross_entropy(h, w, targets, chunk_size=3, bias=b, softcap=1.5, scale=0.7), args)


def test_frozen_head_skips_weight_matmul_and_hidden_grad_is_exact():
    hidden, weight, bias, targets = _inputs()
    h = hidden.clone().requires_grad_()
    with _CountMatmuls() as frozen:
        chunked_cross_entropy(h, weight, targets, chunk_size=10, bias=bias).backward()
    assert weight.grad is None and bias.grad is None
    # 4 chunks: logits + hidden-gradient matmul each, and no weight-gradient matmul
    assert len(frozen.calls) == 2 * 4
    ref_h = hidden.double().requires_grad_()
    F.cross_entropy(ref_h @ weight.double().T + bias.double(), targets, reduction="sum").backward()
    torch.testing.assert_close(h.grad.double(), ref_h.grad, rtol=1e-5, atol=1e-6)

    with _CountMatmuls() as trainable:
        chunked_cross_entropy(h, weight.clone().requires_grad_(), targets, chunk_size=10, bias=bias).backward()
    assert len(trainable.calls) == 3 * 4


def test_no_grad_path_computes_only_the_loss():
    hidden, weight, bias, targets = _inputs()
    hidden.requires_grad_()
    with torch.no_grad(), _CountMatmuls() as mode:
        loss = chunked_cross_entropy(hidden, weight, targets, chunk_size=10, bias=bias)
    assert len(mode.calls) == 4 and loss.grad_fn is None
    ref = F.cross_entropy(hidden.detach() @ weight.T + bias, targets, reduction="sum")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("native_bf16", [False, True])
def test_bf16_autocast_close_to_fp32_and_grads_in_input_dtype(native_bf16):
    # Under autocast the matmuls run in bf16 (the fast path on this CPU) and the softmax in fp32.
    # bf16 inputs: gradients come back in bf16; fp32 inputs (fp32 master weights): in fp32.
    hidden, weight, bias, targets = _inputs(n=64, h=32, v=300)
    dtype = torch.bfloat16 if native_bf16 else torch.float32
    leaves = [t.to(dtype).clone().requires_grad_() for t in (hidden, weight, bias)]
    with torch.autocast("cpu", dtype=torch.bfloat16), _CountMatmuls() as mode:
        loss = chunked_cross_entropy(*leaves[:2], targets, chunk_size=20, bias=leaves[2], softcap=3.0)
    loss.backward()
    assert mode.calls and all(dtypes == (torch.bfloat16, torch.bfloat16) for dtypes in mode.calls)
    assert loss.dtype == torch.float32

    ref_leaves = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    ref = F.cross_entropy(_reference_logits(*ref_leaves, 3.0, None), targets, reduction="sum")
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-2, atol=0)
    for name, leaf, r in zip(("hidden", "weight", "bias"), leaves, ref_leaves):
        assert leaf.grad.dtype == dtype, name
        # relative error of the whole gradient: bf16 rounding of logits and of the gradient matmuls
        err = (leaf.grad.double() - r.grad).norm() / r.grad.norm()
        assert err < 2e-2, (name, err.item())


def test_empty_input_gives_zero_loss_and_zero_grads():
    _, weight, bias, _ = _inputs()
    hidden = torch.zeros(0, H, requires_grad=True)
    weight.requires_grad_()
    bias.requires_grad_()
    loss = chunked_cross_entropy(hidden, weight, torch.zeros(0, dtype=torch.long), bias=bias)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert hidden.grad.shape == (0, H)
    assert torch.equal(weight.grad, torch.zeros(V, H)) and torch.equal(bias.grad, torch.zeros(V))

    logps = token_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long), bias=bias)
    assert logps.shape == (0,)
    logps.sum().backward()  # still in the graph


@pytest.mark.parametrize("chunk_size", [1, 8, 1024])
@pytest.mark.parametrize("softcap,scale", [(None, None), (1.5, 2.0)])
@pytest.mark.parametrize("head", ["trainable", "frozen"])
def test_token_logprobs_equal_log_softmax_gather(chunk_size, softcap, scale, head):
    # Both backward paths: a frozen head (row gradients stored in the forward) and a trainable one
    # (chunks recomputed in backward).
    hidden, weight, bias, targets = _inputs()
    trainable = [True, head == "trainable", head == "trainable"]
    # a per-token upstream gradient, as DPO's would be: each row's gradient has its own factor
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(1))

    def ours(h, w, b):
        return token_logprobs(h, w, targets, chunk_size=chunk_size, bias=b, softcap=softcap, scale=scale)

    def ref(h, w, b):
        logits = _reference_logits(h, w, b, softcap, scale)
        return logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)

    logps, grads = _grads(ours, (hidden, weight, bias), upstream, trainable)
    ref_logps, ref_grads = _grads(ref, [t.double() for t in (hidden, weight, bias)], upstream.double(), trainable)
    assert logps.shape == (N,) and logps.dtype == torch.float32
    torch.testing.assert_close(logps.double(), ref_logps, rtol=1e-5, atol=1e-6)
    for name, g, r, req in zip(("hidden", "weight", "bias"), grads, ref_grads, trainable):
        if not req:
            assert g is None
            continue
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-6 * r.abs().max().item(), msg=name)
    with torch.no_grad():
        torch.testing.assert_close(ours(hidden, weight, bias), logps)
    # summed CE is the negated sum of the log-probs
    ce = chunked_cross_entropy(hidden, weight, targets, bias=bias, softcap=softcap, scale=scale)
    torch.testing.assert_close(ce, -logps.sum(), rtol=1e-5, atol=0)


def test_token_logprobs_gradcheck_float64():
    hidden, weight, bias, targets = _inputs(torch.float64, n=11, h=4, v=9)
    hidden.requires_grad_()
    def fn(h, w, b):
        return token_logprobs(h, w, targets, chunk_size=3, bias=b, softcap=1.5, scale=0.7)

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))  # frozen head
    assert torch.autograd.gradcheck(fn, (hidden, weight.requires_grad_(), bias.requires_grad_()))


def test_token_logprobs_matmul_count_per_path():
    # Frozen head: forward does logits + row-gradient matmuls, backward none. Trainable head: forward
    # does logits only, backward recomputes them and adds the hidden and weight gradient matmuls.
    hidden, weight, _, targets = _inputs()
    h = hidden.clone().requires_grad_()
    for w, forward_mm, backward_mm in ((weight, 2 * 4, 0), (weight.clone().requires_grad_(), 4, 3 * 4)):
        with _CountMatmuls() as fwd:
            logps = token_logprobs(h, w, targets, chunk_size=10)
        with _CountMatmuls() as bwd:
            logps.sum().backward()
        assert (len(fwd.calls), len(bwd.calls)) == (forward_mm, backward_mm)


def test_token_logprobs_bf16_autocast():
    hidden, weight, _, targets = _inputs(n=64, h=32, v=300)
    h = hidden.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps = token_logprobs(h, weight.bfloat16(), targets, chunk_size=20)
    logps.sum().backward()
    assert logps.dtype == torch.float32 and h.grad.dtype == torch.bfloat16
    ref_h = hidden.double().requires_grad_()
    ref = (ref_h @ weight.double().T).log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    ref.sum().backward()
    assert ((logps.double() - ref.detach()).norm() / ref.norm()).item() < 1e-2
    assert ((h.grad.double() - ref_h.grad).norm() / ref_h.grad.norm()).item() < 2e-2


@pytest.mark.parametrize("fn", [chunked_cross_entropy, token_logprobs])
@pytest.mark.parametrize("change,match", [
    ({"hidden": torch.zeros(2, 3, H)}, r"hidden must be \(N, H\)"),
    ({"weight": torch.zeros(V, H + 1)}, r"weight must be the LM head \(V, H\)"),
    ({"targets": torch.zeros(N + 1, dtype=torch.long)}, r"targets must be \(N,\)"),
    ({"targets": torch.zeros(N, dtype=torch.int32)}, "torch.long"),
    ({"targets": torch.full((N,), -100)}, r"drop ignored positions \(label -100\)"),
    ({"targets": torch.full((N,), V)}, r"lie in \[0, 50\)"),
    ({"bias": torch.zeros(V + 1)}, r"bias must be \(V,\)"),
    ({"chunk_size": 0}, "chunk_size must be a positive int"),
    ({"softcap": 0.0}, "softcap must be > 0"),
])
def test_malformed_inputs_raise_value_error(fn, change, match):
    hidden, weight, _, targets = _inputs()
    kwargs = {"hidden": hidden, "weight": weight, "targets": targets} | change
    with pytest.raises(ValueError, match=match):
        fn(kwargs.pop("hidden"), kwargs.pop("weight"), kwargs.pop("targets"), **kwargs)


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _peak_rss_growth_mib(fn) -> float:
    """Peak resident memory added while fn() runs: Linux resets the high-water mark (VmHWM) on "5"."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss_mib("VmRSS")
    fn()
    return _rss_mib("VmHWM") - before


def _can_reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _can_reset_peak_rss(), reason="needs Linux /proc/self/clear_refs to reset peak RSS")
def test_peak_memory_is_one_chunk_not_full_logits():
    # Peak RSS growth of one forward + backward at N=2048, V=32k, H=64 (fp32, trainable head): the full
    # logits are 250 MiB and the naive graph holds three such buffers (logits, log-softmax, their
    # gradient). Chunked, the peak should be one 1024-row chunk of fp32 logits (125 MiB) plus the weight
    # gradient and its scaled copy (2 x 7.8 MiB). Large buffers are mmapped, so RSS follows live tensors.
    n, v, h, chunk = 2048, 32000, 64, 1024
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    runs = {
        "naive_ce": lambda: F.cross_entropy(hidden @ weight.T, targets, reduction="sum"),
        "chunked_ce": lambda: chunked_cross_entropy(hidden, weight, targets, chunk_size=chunk),
        "naive_logps": lambda: (hidden @ weight.T).log_softmax(-1).gather(1, targets[:, None]).sum(),
        "chunked_logps": lambda: token_logprobs(hidden, weight, targets, chunk_size=chunk).sum(),
    }
    growth = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small ops crawl when 2 threads contend on a busy 2-core runner
    try:
        for name, run in runs.items():
            growth[name] = _peak_rss_growth_mib(lambda run=run: run().backward())
            hidden.grad = weight.grad = None
    finally:
        torch.set_num_threads(threads)
    logits_mib, chunk_mib, weight_mib = n * v * 4 / 2**20, chunk * v * 4 / 2**20, v * h * 4 / 2**20
    for kind in ("ce", "logps"):
        naive, chunked = growth[f"naive_{kind}"], growth[f"chunked_{kind}"]
        assert naive > 2 * logits_mib, growth  # the measurement sees the naive graph's full logits
        assert chunked < 0.5 * naive, growth
        assert chunked < 1.5 * chunk_mib + 2 * weight_mib, growth  # two chunks alive at once would fail


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
def test_completion_logprobs_equal_full_log_softmax(dtype, packed):
    # Reference: the full float32 log-softmax of the (B, T, V) logits, shifted so logits[:, t] scores
    # labels[:, t + 1], summed over the trained (non -100) positions of each sequence. Packed rows hold
    # several documents; segment_ids gives each token's document and the sums are per document.
    g = torch.Generator().manual_seed(3)
    b, t, v = 3, 11, 29
    logits = (torch.randn(b, t, v, generator=g) * 2).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[:, :3] = -100  # a prompt
    labels[1, 8:] = -100  # padding
    segment_ids, n = None, b
    if packed:
        segment_ids = torch.tensor([[0] * 6 + [1] * 5, [2] * 11, [3] * 4 + [4] * 7])
        labels[0, 6:8] = -100  # the second document's prompt
        n = 5
    upstream = torch.randn(n, generator=g)

    def reference(x):
        logps = x.float().log_softmax(-1)[:, :-1].gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
        keep = labels[:, 1:] != -100
        seg = (torch.arange(b)[:, None].expand(b, t) if segment_ids is None else segment_ids)[:, 1:]
        sums = torch.zeros(n).index_add(0, seg[keep], logps[keep])
        return sums, torch.zeros(n).index_add(0, seg[keep], torch.ones(int(keep.sum())))

    x_ref = logits.detach().clone().requires_grad_()
    want, counts = reference(x_ref)
    (want * upstream).sum().backward()
    x = logits.detach().clone().requires_grad_()
    sums, means = completion_logprobs(x, labels, segment_ids=segment_ids, num_segments=n, chunk_size=4)
    (sums * upstream).sum().backward()
    assert sums.dtype == torch.float32
    assert counts.min() > 0  # every sequence has completion tokens, so the means are all defined
    torch.testing.assert_close(sums, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(means, want / counts, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the no-graph path gives the same values
        torch.testing.assert_close(completion_logprobs(logits, labels, segment_ids=segment_ids,
                                                       num_segments=n)[0], want, rtol=1e-5, atol=1e-5)
