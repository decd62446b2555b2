"""bench/perf_table.py's set-up, not its timings: where each kind of run writes its table, that an autocast
run's steps run under autocast and a compiled run times compiled models (no timing is asserted)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
ROOT_DOCS = Path(__file__).resolve().parents[1] / "docs"
from perf_table import default_output_name, Setup, SIZES, table_title  # noqa: E402


def test_no_kind_of_run_overwrites_another_kinds_table() -> None:
    runs = {("cpu", "float32", None): "performance.md", ("cpu", "bfloat16", None): "performance-bfloat16.md",
            ("cpu", "float32", "bfloat16"): "performance-autocast.md",
            ("cuda", "bfloat16", None): "performance-gpu.md",
            ("cuda", "float32", "bfloat16"): "performance-gpu-autocast.md",
            ("cuda", "float32", None): "performance-gpu-float32.md",
            ("cpu", "float32", None, True): "performance-compile.md",
            ("cuda", "bfloat16", None, True): "performance-gpu-compile.md"}
    assert {run: default_output_name(*run) for run in runs} == runs


def test_each_kind_of_table_has_its_own_title() -> None:
    """`peftkit docs` lists the pages by title: the bfloat16 CPU table was a second 'Performance'."""
    size = SIZES["small"]
    titles = [table_title(Setup("cpu", torch.float32, size)), table_title(Setup("cpu", torch.bfloat16, size)),
              table_title(Setup("cpu", torch.float32, size, torch.bfloat16)),
              table_title(Setup("cpu", torch.float32, size, compiled=True)),
              table_title(Setup("cuda", torch.bfloat16, size)), table_title(Setup("cuda", torch.float32, size))]
    assert titles == ["# Performance", "# Performance in bfloat16", "# Performance under bfloat16 autocast",
                      "# Performance with torch.compile", "# Performance on a GPU", "# Performance on a GPU in float32"]
    for name in ("performance", "performance-bfloat16", "performance-autocast", "performance-compile"):
        assert (ROOT_DOCS / f"{name}.md").read_text().splitlines()[0] in titles


def test_a_compiled_setup_times_compiled_models_run_before_the_rounds() -> None:
    """``--compile``: the rounds time ``torch.compile(model)``, each called twice first (no round times a
    compilation); without it, the model itself, not called before."""
    from perf_table import compiled_and_run

    calls = []
    model = torch.nn.Linear(3, 2)
    make = lambda m, ids: lambda: calls.append(m)  # noqa: E731
    compiled = Setup("cpu", torch.float32, SIZES["small"], compiled=True)
    timed = compiled_and_run(compiled, {"base": model}, make, torch.zeros(1))
    assert len(calls) == 2 and isinstance(calls[0], torch._dynamo.eval_frame.OptimizedModule)
    assert calls[0]._orig_mod is model and compiled.describe().endswith("torch.compile'd (inductor)")
    timed["base"]()
    plain = compiled_and_run(Setup("cpu", torch.float32, SIZES["small"]), {"base": model}, make, torch.zeros(1))
    assert len(calls) == 3
    plain["base"]()
    assert calls[3] is model


def test_an_autocast_setup_runs_each_step_under_autocast_and_says_so() -> None:
    seen = []

    def step(backward: bool = True) -> None:
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), backward))

    mixed = Setup("cpu", torch.float32, SIZES["small"], torch.bfloat16)
    mixed.run(step)(backward=False)
    Setup("cpu", torch.float32, SIZES["small"]).run(step)()
    assert seen[0] == (True, torch.bfloat16, False) and seen[1][0] is False
    assert mixed.describe().endswith("float32 under bfloat16 autocast")


def test_the_saved_activations_of_a_step_count_sparse_tensors_too() -> None:
    """PEFT's SHiRA keeps a sparse tensor for backward: its indices and values are counted (the run crashed on it
    before: a sparse tensor has no storage of its own)."""
    from perf_table import saved_activation_bytes

    values = torch.randn(5, requires_grad=True)
    indices = torch.tensor([[0, 1, 2, 3, 4], [4, 3, 2, 1, 0]])
    dense = torch.randn(5, 5)

    def step(backward: bool = True) -> None:
        sparse = torch.sparse_coo_tensor(indices, values, (5, 5))
        torch.sparse.mm(sparse, dense).sum()

    assert saved_activation_bytes(step, set()) >= indices.numel() * 8 + values.numel() * 4


def test_the_floor_counts_in_place_products_as_their_out_of_place_forms() -> None:
    """DeLoRA's training forward accumulates its base product with ``addmm_`` (``addmm(out=)`` takes no
    autograd), which torch's FLOP counter has no formula for: the step floor left the base product out."""
    from perf_table import step_flops

    x, w, out = torch.randn(6, 4), torch.randn(4, 3), torch.zeros(6, 3)
    batched_x, batched_w, batched_out = torch.randn(2, 6, 4), torch.randn(2, 4, 3), torch.zeros(2, 6, 3)
    plain = step_flops(lambda: (torch.addmm(out, x, w), torch.baddbmm(batched_out, batched_x, batched_w)))
    in_place = step_flops(lambda: (out.addmm_(x, w), batched_out.baddbmm_(batched_x, batched_w)))
    assert in_place == plain == 2 * 6 * 4 * 3 * 3


def test_the_subnormal_share_counts_every_call_s_subnormal_results() -> None:
    from perf_table import subnormal_share

    tiny, normal = torch.full((4,), 1e-20), torch.full((4,), 1e-3)
    assert subnormal_share(lambda: tiny * tiny) == 1.0  # 1e-40: below float32's smallest normal number
    assert subnormal_share(lambda: (tiny * tiny, normal * normal)) == 0.5
    assert subnormal_share(lambda: (normal * normal, torch.zeros(4) * tiny)) == 0.0  # zero is not subnormal
    sparse = torch.sparse_coo_tensor(torch.tensor([[0, 1]]), torch.tensor([1e-20, 1.0]), (3,), check_invariants=True)
    assert subnormal_share(lambda: (sparse * 2, tiny * tiny)) == 1.0  # a sparse result is skipped, not a crash


def test_the_adalora_row_times_adalora_not_denormal_arithmetic() -> None:
    """AdaLoRA's ``init_weights=false`` (every factor from N(0, 1), as PEFT's) drove a step's gradients to
    underflow, and the row timed subnormal arithmetic (twice as slow, peft's as much as peftkit's). The row's
    start is PEFT's with the singular values redrawn: an adapter that changes the outputs, without underflow."""
    import copy

    import peftkit
    from bench_lora import build_base
    from perf_table import METHODS, redrawn, SUBNORMAL_LIMIT, subnormal_share
    from timing import lm_train_step

    size = SIZES["small"]
    base = build_base(hidden=size.hidden, intermediate=size.intermediate, layers=1, heads=size.heads,
                      vocab=size.vocab, positions=256)
    ids = torch.randint(0, size.vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    spec = METHODS["adalora"][1]
    old_spec = spec.replace("target_modules", "init_weights=false,target_modules")

    def share(spec: str, key: str) -> float:
        torch.manual_seed(0)
        model = redrawn(peftkit.adapt(copy.deepcopy(base), spec), key).train()
        return subnormal_share(lm_train_step(model, ids))

    assert share(old_spec, "none") > SUBNORMAL_LIMIT  # the old start: the check sees the underflow
    assert share(spec, "adalora") < SUBNORMAL_LIMIT
    models = [redrawn(peftkit.adapt(copy.deepcopy(base), spec), "adalora").eval() for _ in range(2)]
    singular = [dict((n, p) for n, p in m.named_parameters() if n.endswith("lora_E")) for m in models]
    assert singular[0] and all(torch.equal(p, singular[1][n]) and p.abs().min() > 0 for n, p in singular[0].items())
    with torch.no_grad():
        assert not torch.allclose(models[0](input_ids=ids).logits, base.eval()(input_ids=ids).logits)


def test_the_table_names_the_steps_that_time_subnormal_arithmetic() -> None:
    from perf_table import subnormal_note

    rows = [{"label": "A", "subnormal": {"peftkit": 0.0, "peft": 2e-5, "base": 0.0}},
            {"label": "B", "subnormal": {"peftkit": 2.4e-3, "peft": 2.3e-3, "base": 0.0}}]
    assert "no training step" in subnormal_note(rows[:1])
    note = subnormal_note(rows)
    assert "B (peftkit 0.24%, peft 0.23%)" in note and "A (" not in note
