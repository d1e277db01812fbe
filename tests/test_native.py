"""The compiled CPU kernel of weight-mode targeting (hf_tdrop.native) against the torch path."""

import ctypes
import logging
import os
import subprocess

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from conftest import run_benchmark
from hf_tdrop import TargetedDropoutConfig, masking, native, patch_model

requires_kernel = pytest.mark.skipif(not native.available(), reason=f"no compiled kernel: {native.unavailable_reason()}")


@pytest.fixture(scope="module")
def portable_build(tmp_path_factory):
    """The kernel compiled with ``-DTDROP_PORTABLE``: its plain C++ lanes, what architectures
    without SSE2 compile."""
    out = tmp_path_factory.mktemp("portable") / "lowest_k_abs_portable.so"
    subprocess.run([native._compiler(), *native._FLAG_SETS[0], "-DTDROP_PORTABLE", str(native.SOURCE), "-o", str(out)],
                   check=True, capture_output=True)
    return out


@pytest.fixture(params=["default", "portable"])
def kernel_build(request, monkeypatch):
    """The kernel as this machine compiles it (SSE2 lanes on x86-64), then its portable build."""
    if request.param == "portable":
        path = request.getfixturevalue("portable_build")
        monkeypatch.setattr(native, "_library", native._bind(ctypes.CDLL(str(path))))
        monkeypatch.setattr(native, "_attempted", True)
    return request.param


@pytest.fixture
def kernel_calls(monkeypatch):
    """A list that gets one entry per call of the compiled kernel (which still runs)."""
    calls = []
    real = native.lowest_k_abs_bracketed
    monkeypatch.setattr(native, "lowest_k_abs_bracketed", lambda *a: calls.append(1) or real(*a))
    return calls


def stable_sort_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    order = torch.argsort(scores.float(), dim=-1, stable=True)
    return torch.zeros(scores.shape, dtype=torch.bool).scatter_(-1, order[..., :k], True)


def weights(rows, n, kind, dtype=torch.float32, transposed=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (n, rows) if transposed else (rows, n)
    if kind == "ties":  # few distinct magnitudes, both signs, and -0.0 next to +0.0
        w = (torch.randint(-3, 4, shape, generator=g) / 4.0).to(dtype)
        w.view(-1)[::7] = -0.0
    else:
        w = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    return w.t() if transposed else w


@requires_kernel
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["normal", "ties"])
def test_kernel_selects_the_stable_sort_set_for_every_k(transposed, dtype, kind, kernel_build):
    # 37 rows: two blocks of 16 and a tail for the transposed (column-block) walk; 53 = 3 chunks of
    # 16 and a tail for the row walk
    for rows, n in [(37, 53), (5, 3), (18, 16), (32, 35)]:
        w = weights(rows, n, kind, dtype, transposed)
        for k in range(1, n):
            mask, lower, upper, failed = native.lowest_k_abs_bracketed(w, k, None, None, 4)
            assert torch.equal(mask, stable_sort_lowest(w.abs(), k)), (rows, n, k)
            assert mask.stride() == w.stride() and failed == rows
            assert bool((lower <= upper).all())


@requires_kernel
@pytest.mark.parametrize("transposed", [False, True])
def test_kernel_is_exact_whatever_the_bracket(transposed, kernel_build):
    """A bracket is only a hint: wrong, empty, inverted, infinite or NaN bounds change which rows
    are counted in the band, never the mask."""
    rows, n, k = 40, 70, 45
    w = weights(rows, n, "normal", transposed=transposed)
    expected = stable_sort_lowest(w.abs(), k)
    _, lower, upper, _ = native.lowest_k_abs_bracketed(w, k, None, None, 4)
    g = torch.Generator().manual_seed(1)
    brackets = {
        "previous call": (lower, upper),
        "random": (torch.rand(rows, generator=g) * 0.04, torch.rand(rows, generator=g) * 0.04),
        "inverted": (upper, lower),
        "empty": (lower.new_full((rows,), 0.5), lower.new_full((rows,), 0.5)),
        "everything": (lower.new_full((rows,), -1.0), lower.new_full((rows,), float("inf"))),
        "nan": (lower.new_full((rows,), float("nan")), upper),
    }
    for name, (lo, hi) in brackets.items():
        for margin in (1, 4, 30):
            mask, new_lower, new_upper, failed = native.lowest_k_abs_bracketed(w, k, lo, hi, margin)
            assert torch.equal(mask, expected), (name, margin)
            assert 0 <= failed <= rows
    assert native.lowest_k_abs_bracketed(w, k, lower, upper, 4)[3] == 0  # its own bracket holds for every row
    assert native.lowest_k_abs_bracketed(w, k, upper, lower, 4)[3] == rows  # an inverted one for none


def torch_path(w2d, gamma, bracket):
    return masking.lowest_k_bracketed(w2d.abs(), masking.fraction_count(gamma, w2d.shape[1]), bracket)


@requires_kernel
@pytest.mark.parametrize("transposed", [False, True])
def test_kernel_follows_the_torch_bracket_rules_over_training(transposed, kernel_build):
    """Over weights that drift (and γ that moves, and a reload), the kernel's masks, brackets and
    margins are the torch implementation's, value for value."""
    rows, n = 48, 300
    w = weights(rows, n, "normal", transposed=transposed, seed=3)
    g = torch.Generator().manual_seed(4)
    ours = theirs = None
    margins = set()
    for step in range(30):
        gamma = [0.75, 0.751, 0.76, 0.5, 0.9][step % 5] if step > 10 else 0.75
        if step == 20:
            w.copy_(torch.randn(w.shape, generator=g))
        mask, ours = masking.targeted_weights_bracketed(w, gamma, ours)
        expected, theirs = torch_path(w, gamma, theirs)
        assert torch.equal(mask, expected) and mask.stride() == expected.stride(), step
        assert torch.equal(ours.lower, theirs.lower) and torch.equal(ours.upper, theirs.upper), step
        assert ours.margin == theirs.margin, step
        margins.add(ours.margin)
        w.add_(torch.randn(w.shape, generator=g), alpha=[1e-4, 1e-3, 3e-3][step % 3])
    assert len(margins) > 1  # the margin adapted on the way


@requires_kernel
def test_kernel_results_do_not_depend_on_the_thread_count():
    w = weights(67, 200, "normal").t().contiguous().t()
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(native.lowest_k_abs_bracketed(w, 150, None, None, 8))
    finally:
        torch.set_num_threads(previous)
    for mask, lower, upper, failed in results[1:]:
        assert torch.equal(mask, results[0][0]) and torch.equal(lower, results[0][1]) and torch.equal(upper, results[0][2])


def _train(make_model, steps=6, seed=0):
    torch.manual_seed(seed)
    model = make_model()
    patch_model(model, config=TargetedDropoutConfig(alpha=0.66, gamma=0.75))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        model(torch.randn(8, 24)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


@requires_kernel
@pytest.mark.parametrize("make_model", [
    lambda: nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 24)),
    lambda: nn.Sequential(Conv1D(nf=40, nx=24), nn.ReLU(), Conv1D(nf=24, nx=40)),
], ids=["linear", "conv1d"])
def test_training_is_bit_identical_with_the_kernel_on_and_off(make_model, monkeypatch, kernel_calls):
    """Same seed, same weights after training: the kernel changes the speed of the selection only
    (same masks, same random draws)."""
    with_kernel = _train(make_model)
    assert len(kernel_calls) == 2 * 6  # two layers, one ranking per step each
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    without = _train(make_model)
    assert len(kernel_calls) == 12  # the switch turned it off
    for a, b in zip(with_kernel, without):
        assert torch.equal(a, b)


def reference_among(w2d, gamma, held):
    """Targeting among survivors written plainly: per row, a stable sort of |w| with held entries
    last, and the floor(γ s_o) first of the s_o survivors."""
    survivors = (~held).sum(dim=1)
    k = torch.tensor([masking.fraction_count(gamma, int(c)) for c in survivors])
    order = torch.argsort(w2d.abs().float().masked_fill(held, float("inf")), dim=1, stable=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(w2d.shape[1]).expand_as(order))
    return ranks < k[:, None]


@pytest.mark.parametrize("kernel", ["on", "off"])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("uniform", [True, False])
def test_targeting_among_survivors_is_exact_over_training(kernel, transposed, uniform, monkeypatch, kernel_calls):
    """Held entries rank last in one bracketed selection when every row keeps the same count, with
    the kernel or without; rows pruned unequally each get their own count."""
    if kernel == "on" and not native.available():
        pytest.skip(f"no compiled kernel: {native.unavailable_reason()}")
    if kernel == "off":
        monkeypatch.setenv(native.ENV_SWITCH, "0")
    rows, n = 40, 90
    w = weights(rows, n, "normal", transposed=transposed, seed=5)
    held = masking.weight_prune_mask(w, 0.5)
    if not uniform:
        held[3, :20] = True  # row 3 pruned further than the others
    g = torch.Generator().manual_seed(6)
    bracket = None
    for step in range(12):
        gamma = 0.75 if step < 8 else 0.6
        mask, bracket = masking.targeted_weights_among_bracketed(w, gamma, held, bracket)
        assert torch.equal(mask, reference_among(w, gamma, held)), step
        assert torch.equal(mask, masking.targeted_weights_among(w, gamma, held))
        assert not bool((mask & held).any())
        assert (bracket is not None) == uniform
        w.add_(torch.randn(w.shape, generator=g), alpha=1e-3)
    assert len(kernel_calls) == (2 * 12 if uniform and kernel == "on" else 0)  # both calls of each step


@requires_kernel
def test_held_pruning_fine_tuning_is_bit_identical_with_the_kernel_on_and_off(monkeypatch, kernel_calls):
    from hf_tdrop import hold_pruned, prune_model

    def fine_tune():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(24, 40), nn.ReLU(), Conv1D(nf=24, nx=40))
        prune_model(model, sparsity=0.5, target_modules=["0", "2"])
        patch_model(model, config=TargetedDropoutConfig(alpha=0.66, gamma=0.75, target_modules=["0", "2"]))
        hold_pruned(model, target_modules=["0", "2"])
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(5):
            model(torch.randn(8, 24)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()]

    with_kernel = fine_tune()
    assert len(kernel_calls) == 2 * 5
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    without = fine_tune()
    for a, b in zip(with_kernel, without):
        assert torch.equal(a, b)
    assert float((with_kernel[0] == 0).float().mean()) >= 0.5  # the held half stayed zero


def test_switch_and_unsupported_inputs_use_the_torch_path(monkeypatch):
    """HF_TDROP_NATIVE=0, float64 weights and (declared) accelerator devices never reach the kernel."""
    monkeypatch.setattr(native, "lowest_k_abs_bracketed", lambda *a: pytest.fail("kernel called"))
    w = torch.randn(12, 20)
    expected = stable_sort_lowest(w.abs(), 15)
    for value in ("0", "false", "OFF", "no"):
        monkeypatch.setenv(native.ENV_SWITCH, value)
        assert not native.available() and value in native.unavailable_reason()
        assert torch.equal(masking.targeted_weights_bracketed(w, 0.75)[0], expected)
    monkeypatch.delenv(native.ENV_SWITCH)
    assert torch.equal(masking.targeted_weights_bracketed(w.double(), 0.75)[0], expected)
    assert not native.supports(w.double()) and not native.supports(torch.randn(2, 3, 4))

    class Wrapped(torch.Tensor):  # a tensor subclass (DTensor, fake tensors): its memory is not the plain matrix
        pass

    assert native.supports(w) and not native.supports(w.as_subclass(Wrapped))
    monkeypatch.setattr(masking.selection, "SYNC_FREE_DEVICE_TYPES", frozenset({"cpu"}))
    assert torch.equal(masking.targeted_weights_bracketed(w, 0.75)[0], expected)


@requires_kernel
def test_kernel_rejects_k_outside_the_open_range():
    w = torch.randn(3, 8)
    for k in (0, 8, 9):
        with pytest.raises(ValueError, match=r"`k` must be an integer in \[1, 7\]"):
            native.lowest_k_abs_bracketed(w, k, None, None, 4)


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """A loader that has not tried yet, compiling into an empty cache folder."""
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_attempted", False)
    monkeypatch.setattr(native, "_reason", None)
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.delenv(native.ENV_SWITCH, raising=False)
    return tmp_path / "cache"


def test_without_a_compiler_the_torch_path_runs_and_one_warning_says_why(fresh_loader, monkeypatch, caplog):
    monkeypatch.setenv("CXX", str(fresh_loader.parent / "no-such-compiler"))
    with caplog.at_level(logging.WARNING, logger="hf_tdrop.native"):
        w = torch.randn(10, 30)
        for _ in range(3):
            mask, bracket = masking.targeted_weights_bracketed(w, 0.5)
            assert torch.equal(mask, stable_sort_lowest(w.abs(), 15)) and bracket is not None
    warnings = [r for r in caplog.records if r.name == "hf_tdrop.native"]
    assert len(warnings) == 1 and "no-such-compiler" in warnings[0].getMessage()
    assert "HF_TDROP_NATIVE=0" in warnings[0].getMessage()
    assert not native.available() and "no-such-compiler" in native.unavailable_reason()
    assert not fresh_loader.exists() or not list(fresh_loader.glob("*.so"))  # no partial file left behind
    with pytest.raises(RuntimeError, match="unavailable"):
        native.lowest_k_abs_bracketed(w, 3, None, None, 4)


def test_no_compiler_on_the_path_is_reported_by_name(fresh_loader, monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    assert not native.available()
    assert native.unavailable_reason().startswith("no C++ compiler found")
    w = torch.randn(6, 10)
    assert torch.equal(masking.targeted_weights_bracketed(w, 0.5)[0], stable_sort_lowest(w.abs(), 5))


@requires_kernel
def test_kernel_is_compiled_once_into_the_cache_folder(fresh_loader, monkeypatch):
    assert native.available()
    built = list(fresh_loader.glob("lowest_k_abs-*.so"))
    record = built[0].with_name(built[0].name + ".sha256")
    assert len(built) == 1 and sorted(fresh_loader.iterdir()) == sorted([built[0], record])  # no temporary left
    stamp = built[0].stat().st_mtime_ns
    # another process (a fresh loader) finds it there and does not compile again
    monkeypatch.setattr(native, "_attempted", False)
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native.subprocess, "run", lambda *a, **k: pytest.fail("compiled again"))
    assert native.available()
    assert built[0].stat().st_mtime_ns == stamp


@requires_kernel
def test_step_overhead_benchmark_compares_the_kernel_with_the_torch_path(capsys, kernel_calls):
    step_overhead, out = run_benchmark("step_overhead", [
        "--archs", "bert", "--layers", "1", "--tokens", "128", "--modes", "weight", "--trials", "2",
        "--warmup", "0", "--refresh_every", "1", "--compare_native"], capsys)
    rows = [line.split(" | ")[2] for line in out.splitlines() if line.startswith("| bert | 128 |")]
    assert rows == ["unpatched", "nn.Dropout p=0.1", "tdrop weight", step_overhead.TORCH_SELECTION]
    assert "compiled CPU selection kernel (hf_tdrop.native): on" in out
    # 2 timed steps of 'tdrop weight' (+ the saved-bytes pass) used the kernel for each of its 6
    # weights; the torch-selection variant never did, and the switch is back to its old value after
    assert len(kernel_calls) == 6 * 3
    assert native.ENV_SWITCH not in os.environ


@requires_kernel
def test_selection_benchmark_prints_both_paths_and_checks_their_masks(capsys):
    for extra in ([], ["--held_fraction", "0.5"]):
        _, out = run_benchmark("selection_kernel", ["--archs", "bert", "gpt2", "--threads", "1", "--rounds", "1", *extra],
                               capsys)
        rows = [line.split(" | ") for line in out.splitlines() if line.startswith(("| bert", "| gpt2"))]
        assert [r[0] for r in rows] == ["| bert", "| gpt2"]
        assert ("0.5 of every row held at zero" in out) == bool(extra)
        for row in rows:
            t_torch, t_kernel, ratio = float(row[2]), float(row[3]), float(row[4].rstrip(" |"))
            assert t_torch > 0 and t_kernel > 0 and ratio == pytest.approx(t_kernel / t_torch, abs=0.01)
    with pytest.raises(SystemExit):
        run_benchmark("selection_kernel", ["--held_fraction", "1.5"], capsys)
    assert "--held_fraction must be in [0, 1), got 1.5" in capsys.readouterr().err


# ------------------------------------------------------------------ the entry point and the cache's trust


@requires_kernel
@pytest.mark.parametrize("bad, message", [
    (lambda w: dict(w2d=torch.empty(3, 8, device="meta")), "plain 2-D CPU"),
    (lambda w: dict(w2d=w.double()), "plain 2-D CPU"),
    (lambda w: dict(w2d=w[None]), "plain 2-D CPU"),
    (lambda w: dict(margin=-10), "`margin` must be an integer"),
    (lambda w: dict(margin=2.5), "`margin` must be an integer"),
    (lambda w: dict(lower=torch.zeros(2), upper=torch.ones(3)), r"`lower` must be a float32 CPU tensor of shape \(3,\)"),
    (lambda w: dict(lower=torch.zeros(3), upper=None), "given together"),
    (lambda w: dict(lower=torch.zeros(3, dtype=torch.float64), upper=torch.ones(3)), "`lower` must be a float32"),
])
def test_entry_point_validates_before_the_kernel_runs(bad, message):
    """A meta tensor used to segfault, a negative margin to abort the process, a short bracket to
    read out of bounds: each is now one ValueError naming the argument."""
    w = torch.randn(3, 8)
    kwargs = dict(w2d=w, k=3, lower=None, upper=None, margin=4)
    kwargs.update(bad(w))
    with pytest.raises(ValueError, match=message):
        native.lowest_k_abs_bracketed(**kwargs)


@requires_kernel
def test_the_c_boundary_returns_error_codes_instead_of_throwing():
    lib = native.library()
    w = torch.randn(3, 8)
    mask = torch.empty(3, 8, dtype=torch.bool)
    lo, hi = torch.empty(3), torch.empty(3)
    call = lambda margin, lower=None, upper=None: lib.tdrop_lowest_k_abs(  # noqa: E731
        w.data_ptr(), 3, 8, 8, 1, 3, lower, upper, margin, mask.data_ptr(), 8, 1, lo.data_ptr(), hi.data_ptr(), 1)
    assert call(-10) == -1  # used to throw std::length_error across extern "C" (abort)
    assert call(4, lower=lo.data_ptr()) == -1  # a bracket needs both bounds
    assert call(4) == 3  # a valid call still works: without a bracket every row counts as failed


@requires_kernel
def test_a_library_planted_in_the_cache_is_not_loaded(fresh_loader, tmp_path, monkeypatch):
    assert native.available()
    built = next(fresh_loader.glob("lowest_k_abs-*.so"))
    # replace it by another library (a build of other source), without its hash record matching
    planted = tmp_path / "planted.cpp"
    planted.write_text('extern "C" { long long tdrop_abi_version() { return 2; } }\n')
    subprocess.run([native._compiler(), "-shared", "-fPIC", str(planted), "-o", str(built)], check=True)
    monkeypatch.setattr(native, "_attempted", False)
    monkeypatch.setattr(native, "_library", None)
    assert native.available()  # rebuilt from the package's source, then loaded
    assert native._verified(built)
    assert hasattr(native.library(), "tdrop_lowest_k_abs")
    w = torch.randn(4, 9)
    assert torch.equal(native.lowest_k_abs_bracketed(w, 4, None, None, 2)[0], stable_sort_lowest(w.abs(), 4))


@requires_kernel
@pytest.mark.skipif(not hasattr(os, "getuid"), reason="no user ids on this OS")
def test_a_cache_folder_others_may_write_is_refused(fresh_loader, monkeypatch, caplog):
    fresh_loader.mkdir(mode=0o700)
    os.chmod(fresh_loader, 0o777)
    with caplog.at_level(logging.WARNING, logger="hf_tdrop.native"):
        assert not native.available()
    assert "writable by group or others" in native.unavailable_reason()
    assert not list(fresh_loader.glob("*.so"))
    w = torch.randn(6, 10)  # the torch path still selects
    assert torch.equal(masking.targeted_weights_bracketed(w, 0.5)[0], stable_sort_lowest(w.abs(), 5))


@requires_kernel
@pytest.mark.skipif(not hasattr(os, "getuid"), reason="no user ids on this OS")
def test_a_cached_library_others_may_write_is_refused(fresh_loader, monkeypatch):
    assert native.available()
    built = next(fresh_loader.glob("lowest_k_abs-*.so"))
    os.chmod(built, 0o777)
    monkeypatch.setattr(native, "_attempted", False)
    monkeypatch.setattr(native, "_library", None)
    assert not native.available()
    assert "writable by group or others" in native.unavailable_reason()


@requires_kernel
def test_nan_rows_follow_the_documented_kernel_order():
    """The kernel orders NaN above +inf and always selects k per row (the torch path may differ in
    rows with NaN, as the module docstring says)."""
    w = torch.tensor([[float("nan"), 1.0, float("inf"), 0.5, float("nan")],
                      [float("nan")] * 5])
    mask = native.lowest_k_abs_bracketed(w, 3, None, None, 2)[0]
    assert mask[0].tolist() == [False, True, True, True, False]
    assert mask[1].tolist() == [True, True, True, False, False]  # all NaN: the lowest columns
    assert "NaN" in native.__doc__
