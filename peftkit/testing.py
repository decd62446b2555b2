"""peftkit's conformance suite for tuning methods: run it against your method.

Every peftkit method, built in or from a plugin, must keep the same promises:
it injects into real architectures and can be removed without a trace, it
leaves the model unchanged at init when it says so, a training step changes
its own parameters only, its files round-trip bit for bit, merging (when it
claims to merge) gives the same outputs, its config round-trips through JSON
and the shorthand (and through Hugging Face PEFT when it declares a
``peft_type``), its parameter count matches its own formula, and the
composition blocks it claims behave as defined. This module checks all of
that on tiny transformers models (hidden size 32, 2 layers; no downloads).

Two ways to run it, both with pytest installed:

- one pytest test per check and architecture, reported individually::

      # tests/test_conformance.py of your plugin
      from peftkit.testing import make_conformance_class

      TestLohaConformance = make_conformance_class("loha[r=4]")

- or everything in one call, raising ``AssertionError`` that lists each
  failed check (returns a :class:`ConformanceReport` otherwise)::

      peftkit.testing.check_method("loha[r=4]")

The method must be registered: installed through its entry point, or
registered for the test with ``peftkit.use_plugin``. An architecture the
method refuses with a ``ConfigError``/``TargetError`` when it is added is
skipped, with the method's message as the reason; refusing every
architecture is a failure. See docs/testing.md for what each check does.

The module also ships a small demo task for "does it learn?" tests and
benchmarks: :func:`sentiment_task` and :func:`train_classifier`
(in :mod:`peftkit.testing_task`).

This module imports torch and transformers when a check runs, not at import.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

from peftkit.core.config import AdapterConfig
from peftkit.core.errors import CompositionError, ConfigError, MergeError, TargetError
from peftkit.testing_models import TINY_MODELS, TinyModel, build_tiny, output_tensor, sample_inputs, tiny_model
from peftkit.testing_task import SENTIMENT_RUNS, DemoRun, TextTask, TrainResult, sentiment_task, train_classifier

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from peftkit.core.model import AdaptedModel

__all__ = ["CHECKS", "DEFAULT_ARCHITECTURES", "SENTIMENT_RUNS", "CheckResult", "CheckSkipped", "ConformanceReport",
           "DemoRun", "TINY_MODELS", "TextTask", "TinyModel", "TrainResult", "build_tiny", "check_method",
           "make_conformance_class", "output_tensor", "run_check", "sample_inputs", "sentiment_task",
           "train_classifier"]

#: Architectures checked unless told otherwise (names of :data:`TINY_MODELS`).
DEFAULT_ARCHITECTURES: tuple[str, ...] = ("llama", "gpt2", "bert", "t5")
#: Blocks whose behaviour the suite checks when a method claims them.
BLOCK_CHECKS = ("stack", "average", "batch_split", "parallel", "fuse", "split")
#: The checks, in the order they run; each takes one architecture.
CHECKS: tuple[str, ...] = ("inject", "identity", "deterministic", "train_step", "save_load", "hotswap", "merge",
                           "config", "peft_config", "parameter_count", *(f"block_{b}" for b in BLOCK_CHECKS))
#: What a config's dropout options are set to by the ``deterministic`` check (eval mode must ignore them).
EVAL_DROPOUT = 0.5
#: The seed torch's global random generator is set to just before the save_load check loads an adapter.
GLOBAL_RNG_AT_LOAD = 20_231_011
#: Largest output difference allowed where an output must equal the base model's (identity at init).
IDENTITY_ATOL = 1e-5


class CheckSkipped(Exception):
    """A check does not apply (the method refuses the architecture, or does not claim the feature)."""


@dataclass(frozen=True)
class CheckResult:
    check: str
    architecture: str
    status: str  # "passed", "skipped" or "failed"
    message: str = ""

    def __str__(self) -> str:
        text = f"{self.check}[{self.architecture}]: {self.status}"
        return f"{text} — {self.message}" if self.message else text


@dataclass
class ConformanceReport:
    """What :func:`check_method` found, check by check."""

    spec: str
    results: list[CheckResult] = field(default_factory=list)

    @property
    def failed(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def skipped(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == "skipped"]

    @property
    def passed(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == "passed"]

    def __str__(self) -> str:
        head = (f"conformance of {self.spec!r}: {len(self.passed)} passed, {len(self.failed)} failed, "
                f"{len(self.skipped)} skipped")
        return "\n".join([head, *(f"  {r}" for r in self.results)])


@dataclass(frozen=True)
class _Options:
    tolerance: float = 1e-4
    identity_at_init: bool | None = None
    seed: int = 0


# -- public entry points ---------------------------------------------------------------------------------------------


def check_method(spec: str | AdapterConfig, *, architectures: Sequence[str | TinyModel] = DEFAULT_ARCHITECTURES,
                 checks: Sequence[str] | None = None, tolerance: float = 1e-4,
                 identity_at_init: bool | None = None, seed: int = 0) -> ConformanceReport:
    """Run every check (or ``checks``) on every architecture; raise AssertionError listing the failures.

    ``spec`` is a shorthand (``"loha[r=4]"``) or a config object of a registered method.
    ``tolerance`` is the largest output difference allowed where outputs must agree
    (merging, composition definitions). ``identity_at_init`` overrides the method's
    ``identity_at_init`` for this spec (e.g. a config with random init). An
    architecture the method refuses (ConfigError/TargetError when adding the
    adapter) is skipped; refusing them all is a failure.
    """
    selected = _select(checks)
    _resolve(spec)
    report = ConformanceReport(_spec_text(spec))
    supported = 0
    for arch in architectures:
        tiny = tiny_model(arch)
        refusal = _refusal(spec, tiny)
        if refusal is not None:
            report.results.extend(CheckResult(c, tiny.name, "skipped", refusal) for c in selected)
            continue
        supported += 1
        for check in selected:
            try:
                run_check(spec, check, tiny, tolerance=tolerance, identity_at_init=identity_at_init, seed=seed)
            except CheckSkipped as exc:
                report.results.append(CheckResult(check, tiny.name, "skipped", str(exc)))
            except AssertionError as exc:
                report.results.append(CheckResult(check, tiny.name, "failed", str(exc)))
            except Exception as exc:  # a crash inside the method is a failure of the check, reported as such
                report.results.append(CheckResult(check, tiny.name, "failed", f"{type(exc).__name__}: {exc}"))
            else:
                report.results.append(CheckResult(check, tiny.name, "passed"))
    if architectures and not supported:
        report.results.append(CheckResult("inject", "any", "failed", _none_supported(spec, architectures)))
    if report.failed:
        raise AssertionError(str(report))
    return report


def run_check(spec: str | AdapterConfig, check: str, architecture: str | TinyModel = "llama", *,
              tolerance: float = 1e-4, identity_at_init: bool | None = None, seed: int = 0) -> None:
    """Run one check on one architecture: returns on success, raises AssertionError on a
    failure and :class:`CheckSkipped` when the check does not apply."""
    if check not in _CHECK_FUNCTIONS:
        raise ValueError(f"unknown conformance check {check!r}; checks: {', '.join(CHECKS)}")
    with _single_thread():
        case = _Case(spec, tiny_model(architecture), _Options(tolerance, identity_at_init, seed))
        _CHECK_FUNCTIONS[check](case)


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Tiny models run many times faster on one thread (no thread hand-off per kernel), most of
    all on a busy machine; the previous setting comes back afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def make_conformance_class(spec: str | AdapterConfig, *,
                           architectures: Sequence[str | TinyModel] = DEFAULT_ARCHITECTURES,
                           checks: Sequence[str] | None = None, tolerance: float = 1e-4,
                           identity_at_init: bool | None = None, seed: int = 0) -> type:
    """A pytest test class with one test per check, parametrized by architecture.

    Assign it to a module-level name that starts with ``Test`` (or subclass it)::

        TestLohaConformance = make_conformance_class("loha[r=4]")

    Tests are named ``test_<check>[<architecture>]``; a check that does not
    apply is reported as skipped with the reason. ``test_supports_an_architecture``
    fails when the method refuses every architecture.
    """
    import pytest

    _resolve(spec)
    tinies = [tiny_model(a) for a in architectures]
    ids = [t.name for t in tinies]
    options = dict(tolerance=tolerance, identity_at_init=identity_at_init, seed=seed)
    namespace: dict[str, Any] = {
        "__doc__": f"peftkit conformance checks for {_spec_text(spec)!r} (see peftkit.testing).",
        "conformance_spec": spec,
    }
    for check in _select(checks):
        namespace[f"test_{check}"] = pytest.mark.parametrize("architecture", tinies, ids=ids)(
            _pytest_test(spec, check, options))

    def test_supports_an_architecture(self: Any) -> None:
        if tinies and all(_refusal(spec, t) is not None for t in tinies):
            raise AssertionError(_none_supported(spec, tinies))

    namespace["test_supports_an_architecture"] = test_supports_an_architecture
    return type("MethodConformance", (), namespace)


def _pytest_test(spec: str | AdapterConfig, check: str, options: dict[str, Any]) -> Callable[[Any, TinyModel], None]:
    def test(self: Any, architecture: TinyModel) -> None:
        import pytest

        try:
            run_check(spec, check, architecture, **options)
        except CheckSkipped as exc:
            pytest.skip(str(exc))

    test.__name__ = f"test_{check}"
    test.__doc__ = _CHECK_FUNCTIONS[check].__doc__
    return test


def _select(checks: Iterable[str] | None) -> list[str]:
    if checks is None:
        return list(CHECKS)
    selected = list(checks)
    unknown = [c for c in selected if c not in _CHECK_FUNCTIONS]
    if unknown:
        raise ValueError(f"unknown conformance check(s) {', '.join(map(repr, unknown))}; checks: {', '.join(CHECKS)}")
    return selected


def _spec_text(spec: str | AdapterConfig) -> str:
    return spec if isinstance(spec, str) else spec.to_shorthand()


def _resolve(spec: str | AdapterConfig) -> None:
    """Fail at once, with peftkit's message, on a spec naming no installed method or a bad option."""
    from peftkit.core.plugins import parse_spec

    parse_spec(spec)


def _refusal(spec: str | AdapterConfig, tiny: TinyModel) -> str | None:
    """The method's reason for refusing this architecture (None when it accepts it; any other
    error is left to the checks, which report it as their failure)."""
    try:
        with _single_thread():
            _Case(spec, tiny, _Options()).adapted(randomized=False)
    except CheckSkipped as exc:
        return str(exc)
    except Exception:
        return None
    return None


def _none_supported(spec: str | AdapterConfig, architectures: Sequence[str | TinyModel]) -> str:
    names = ", ".join(tiny_model(a).name for a in architectures)
    return (f"{_spec_text(spec)!r} refused every architecture checked ({names}); a method must inject into at "
            f"least one (see the skip reasons for each)")


# -- one check's context ---------------------------------------------------------------------------------------------


class _Case:
    """A spec, a tiny architecture and options, with helpers that build adapted models."""

    def __init__(self, spec: str | AdapterConfig, tiny: TinyModel, options: _Options) -> None:
        from peftkit.core.plugins import parse_spec

        self.spec = spec
        self.tiny = tiny
        self.options = options
        self.method, self.config = parse_spec(spec)
        self.where = f"{_spec_text(spec)} on {tiny.name}"

    # models and inputs

    def base(self) -> "torch.nn.Module":
        return build_tiny(self.tiny, seed=self.options.seed)

    def inputs(self, batch: int = 2) -> dict[str, Any]:
        return sample_inputs(self.tiny, batch=batch, seed=self.options.seed + 1)

    def adapted(self, *names: str, randomized: bool = True, base: "torch.nn.Module | None" = None
                ) -> "AdaptedModel":
        """An AdaptedModel with one adapter of the spec per name (default: "default"), in eval
        mode, none active. ``randomized`` moves each adapter's parameters away from their
        initial values (each name by a different draw), so equalities are not trivial."""
        from peftkit.core.model import AdaptedModel

        model = AdaptedModel(base if base is not None else self.base())
        for index, name in enumerate(names or ("default",)):
            try:
                model.add_adapter(name, self.spec)
            except (ConfigError, TargetError) as exc:
                raise CheckSkipped(f"{self.method.name} does not support {self.tiny.name} "
                                   f"({type(model.base_model).__name__}): {exc}") from None
            if randomized:
                randomize(model, name, seed=self.options.seed + 1000 + index)
        return model.eval()

    def output(self, model: "torch.nn.Module", active: Any = "keep", inputs: dict[str, Any] | None = None,
               **kwargs: Any) -> "torch.Tensor":
        import torch

        if active != "keep":
            model.set_active(active)
        with torch.no_grad():
            out = output_tensor(model(**(inputs or self.inputs()), **kwargs))
        return out.detach().float().clone()

    @property
    def identity(self) -> bool:
        claimed = self.options.identity_at_init
        return bool(self.method.identity_at_init if claimed is None else claimed)

    def close(self, actual: "torch.Tensor", expected: "torch.Tensor", what: str, atol: float | None = None) -> None:
        check_close(actual, expected, f"{self.where}: {what}", self.options.tolerance if atol is None else atol)


def randomize(model: "AdaptedModel", name: str, seed: int = 0, scale: float = 0.1) -> None:
    """Add seeded noise (std ``scale``) to every floating-point parameter the method made for
    adapter ``name`` (its modules_to_save copies, e.g. a task head, are left as copied)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in _own_parameters(model, name):
            if param.is_floating_point():
                noise = torch.randn(param.shape, generator=gen, dtype=torch.float32) * scale
                param.add_(noise.to(device=param.device, dtype=param.dtype))


def check_close(actual: "torch.Tensor", expected: "torch.Tensor", what: str, atol: float) -> None:
    """AssertionError naming ``what`` unless the tensors have one shape and differ by at most ``atol``."""
    if tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(f"{what}: output shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    diff = (actual.float() - expected.float()).abs().max().item() if actual.numel() else 0.0
    if not diff <= atol:  # also catches NaN
        raise AssertionError(f"{what}: outputs differ by up to {diff:.3g} (allowed {atol:g})")


def _differs(a: "torch.Tensor", b: "torch.Tensor", atol: float = 1e-6) -> bool:
    if tuple(a.shape) != tuple(b.shape):
        return True
    return bool((a.float() - b.float()).abs().max().item() > atol)


def _own_parameters(model: "AdaptedModel", name: str) -> list["torch.nn.Parameter"]:
    """Adapter ``name``'s parameters created by its method (not its modules_to_save copies)."""
    from peftkit.core.layer import ModulesToSave

    copies = {id(p) for m in model.modules() if isinstance(m, ModulesToSave) and name in m.copies
              for p in m.copies[name].parameters()}
    return [p for p in model.adapter_parameters(name) if id(p) not in copies]


# -- the checks ------------------------------------------------------------------------------------------------------


def _check_inject(case: _Case) -> None:
    """The adapter lands on sites (or the model's inputs), has parameters, trains alone, runs,
    and delete_adapter() leaves the model exactly as before (weights, modules, outputs)."""
    import torch

    from peftkit.core.layer import ModulesToSave, TunerLayer

    base = case.base()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    module_types = {n: type(m) for n, m in base.named_modules()}
    base_out = case.output(base)
    model = case.adapted(randomized=False, base=base)
    record = model.adapter_record("default")
    assert record.sites or record.model_adapter, (
        f"{case.where}: the adapter was added but put no module at any site and rewrites no input; "
        f"sites() returned nothing and create_model_adapter() returned None")
    for site in record.sites:
        layer = model.base_model.get_submodule(site.name)
        assert isinstance(layer, TunerLayer) and "default" in layer.adapters, (
            f"{case.where}: site {site.name!r} was returned by sites() but holds no adapter module "
            f"(create_layer_adapter returned None?)")
    own = _own_parameters(model, "default")
    assert sum(p.numel() for p in own) > 0, f"{case.where}: the adapter has no parameters to train"
    assert not any(p.requires_grad for p in model.parameters()), (
        f"{case.where}: parameters are trainable right after add_adapter(); the core freezes everything until "
        f"train_adapter() — do not set requires_grad in the method")
    model.train_adapter("default")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.adapter_parameters("default")}, (
        f"{case.where}: after train_adapter('default') the trainable parameters are not exactly the adapter's")
    out = case.output(model)
    assert torch.isfinite(out).all(), f"{case.where}: the adapted model's output has NaN or inf values"
    model.delete_adapter("default")
    leftovers = [n for n, m in model.base_model.named_modules() if isinstance(m, (TunerLayer, ModulesToSave))]
    assert not leftovers, f"{case.where}: delete_adapter() left peftkit modules at {leftovers[:3]}"
    after = dict(model.base_model.state_dict())
    assert after.keys() == before.keys(), (
        f"{case.where}: after delete_adapter() the state dict gained {sorted(after.keys() - before.keys())[:3]} "
        f"and lost {sorted(before.keys() - after.keys())[:3]}")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"{case.where}: adding and deleting the adapter changed base tensors {changed[:3]}"
    types_after = {n: type(m) for n, m in model.base_model.named_modules()}
    assert types_after == module_types, f"{case.where}: delete_adapter() did not restore the original modules"
    assert torch.equal(case.output(model), base_out), (
        f"{case.where}: after delete_adapter() the model's output differs from the base model's")


def _check_identity(case: _Case) -> None:
    """With the method's initial weights, the output equals the base model's when the method
    declares identity_at_init, and differs from it otherwise."""
    base_out = case.output(case.base())
    model = case.adapted(randomized=False)
    out = case.output(model, "default")
    if case.identity:
        check_close(out, base_out, f"{case.where}: the method declares identity_at_init=True, but right after "
                                   f"injection the output is not the base model's (if this config starts "
                                   f"from random weights on purpose, pass identity_at_init=False)", IDENTITY_ATOL)
        with model.disable_adapters():
            check_close(case.output(model), base_out, f"{case.where}: inside disable_adapters()", 0.0)
    else:
        assert _differs(out, base_out), (
            f"{case.where}: the method declares identity_at_init=False, but the output equals the base model's "
            f"right after injection; declare identity_at_init = True")


def _check_deterministic(case: _Case) -> None:
    """In eval mode the forward is deterministic: two forwards (under different torch seeds) are
    bit-identical, and with every dropout option of the config set to 0.5 the output equals the
    spec's output for the same weights (dropout acts in training only)."""
    import dataclasses

    import torch

    model = case.adapted()
    torch.manual_seed(case.options.seed + 1)
    first = case.output(model, "default")
    torch.manual_seed(case.options.seed + 2)
    second = case.output(model)
    assert torch.equal(first, second), (f"{case.where}: two eval-mode forwards differ (max diff "
                                        f"{_max_diff(first, second):.3g}); is something random outside training?")
    dropouts = {f.name: EVAL_DROPOUT for f in dataclasses.fields(case.config)
                if "dropout" in f.name and type(getattr(case.config, f.name)) is float}
    if not dropouts:
        return
    try:
        with_dropout = case.config.replace(**dropouts)
    except ConfigError:  # the method does not take 0.5 there: nothing more to compare
        return
    model.add_adapter("dropout", with_dropout)
    _copy_parameters(model, "default", "dropout", case.where)
    model.eval()
    torch.manual_seed(case.options.seed + 3)
    case.close(case.output(model, "dropout"), first,
               f"eval-mode output with {', '.join(f'{k}={v}' for k, v in dropouts.items())} vs without "
               f"(same weights): dropout must act in training only")


def _check_train_step(case: _Case) -> None:
    """One optimizer step after train_adapter('default') changes that adapter's parameters and
    nothing else: not the base model, not a second adapter of the same method."""
    import torch

    base = case.base()
    base_ids = {id(p): n for n, p in base.named_parameters()}
    model = case.adapted("default", "other", base=base)
    mine = {id(p) for p in model.adapter_parameters("default")}
    theirs = {id(p) for p in model.adapter_parameters("other")}
    shared = sorted(base_ids[i] for i in mine if i in base_ids)
    assert not shared, f"{case.where}: the adapter owns base-model parameters {shared[:3]}; it must create its own"
    assert not mine & theirs, f"{case.where}: adapters 'default' and 'other' share parameters"
    model.train_adapter("default")
    model.train()
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    before = {n: t.detach().clone() for n, t in model.state_dict(keep_vars=True).items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss = output_tensor(model(**case.inputs())).float().pow(2).mean()
    loss.backward()
    with_grad = [p for p in model.parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)]
    assert any(id(p) in mine for p in with_grad), (
        f"{case.where}: no parameter of the trained adapter received a gradient; is the adapter in the forward "
        f"pass, and are its tensors nn.Parameters?")
    strays = [names.get(id(p), "?") for p in with_grad if id(p) not in mine]
    assert not strays, f"{case.where}: parameters outside the trained adapter got gradients: {strays[:3]}"
    optimizer.step()
    model.eval()
    mine_names = {names[i] for i in mine if i in names}
    after = model.state_dict(keep_vars=True)
    changed = [n for n, t in after.items() if not torch.equal(before[n], t.detach())]
    assert any(n in mine_names for n in changed), f"{case.where}: the optimizer step changed no adapter parameter"
    others = [n for n in changed if n not in mine_names]
    assert not others, (f"{case.where}: a training step of adapter 'default' changed tensors outside it: "
                        f"{others[:3]}")


def _check_save_load(case: _Case) -> None:
    """save_adapter() then loading onto a fresh base model gives bit-identical tensors and outputs;
    loading under another name next to the original gives the same tensors too. torch's global random
    generator is moved before the load, so a module that draws a tensor it does not save from it (rather
    than from a seeded torch.Generator) loads differently and fails here."""
    import torch

    from peftkit.core.model import AdaptedModel
    from peftkit.core.serialization import CONFIG_NAME, PICKLE_NAMES, WEIGHTS_NAME, adapter_tensors

    model = case.adapted()
    expected = case.output(model, "default")
    saved = {k: t.detach().clone() for k, t in adapter_tensors(model, "default").items()}
    with tempfile.TemporaryDirectory(prefix="peftkit-conformance-") as tmp:
        folder = Path(tmp) / "adapter"
        model.save_adapter(str(folder), "default")
        files = {p.name for p in folder.iterdir()}
        assert {CONFIG_NAME, WEIGHTS_NAME} <= files, f"{case.where}: the saved folder holds only {sorted(files)}"
        assert not files & set(PICKLE_NAMES), f"{case.where}: the saved folder holds a pickle file"
        base = case.base()  # seeds the global generator: move it away from its state when the adapter was made
        with torch.random.fork_rng():
            torch.manual_seed(GLOBAL_RNG_AT_LOAD)
            loaded = AdaptedModel.from_pretrained(base, str(folder))
        got = adapter_tensors(loaded, "default")
        assert got.keys() == saved.keys(), (
            f"{case.where}: tensors after loading differ in keys: missing {sorted(saved.keys() - got.keys())[:3]}, "
            f"extra {sorted(got.keys() - saved.keys())[:3]}")
        for key, tensor in saved.items():
            value = got[key].detach()
            assert value.dtype == tensor.dtype and torch.equal(value, tensor), (
                f"{case.where}: tensor {key} is not bit-identical after save and load")
        out = case.output(loaded)
        assert torch.equal(out, expected), (
            f"{case.where}: the loaded adapter's output is not bit-identical to the saved one's (max diff "
            f"{_max_diff(out, expected):.3g}): a tensor the forward uses is not saved. Either tensors() leaves "
            f"out one the adapter changes (return it too), or the adapter draws one from torch's global random "
            f"generator (torch.randn, nn.init; the check moved it before the load): save it, or draw it from a "
            f"torch.Generator seeded from the config")
        model.load_adapter(str(folder), "copy", activate=False)
        twin = adapter_tensors(model, "copy")
        assert all(torch.equal(twin[k].detach(), t) for k, t in saved.items()), (
            f"{case.where}: loading the folder under another name gave other tensors")


def _check_hotswap(case: _Case) -> None:
    """hotswap_adapter() with another saved adapter of the spec replaces the weights in place: the output
    equals a fresh load of that folder, every parameter is the same object as before, and the adapter stays
    active (a compiled model would not recompile). A method whose adapter holds computed tensors must
    refuse with AdapterLoadError (then the check is skipped with that reason)."""
    import torch

    from peftkit.core.errors import AdapterLoadError
    from peftkit.core.model import AdaptedModel

    model = case.adapted()
    model.set_active("default")
    donor = case.adapted("default", "other")  # "other" draws other weights than "default"
    with tempfile.TemporaryDirectory(prefix="peftkit-conformance-") as tmp:
        folder = Path(tmp) / "other"
        donor.save_adapter(str(folder), "other")
        expected = case.output(AdaptedModel.from_pretrained(case.base(), str(folder)))
        before = [id(p) for p in model.parameters()]
        try:
            model.hotswap_adapter(str(folder), "default")
        except AdapterLoadError as exc:
            if "computed from other parameters" in str(exc):
                raise CheckSkipped(f"{case.method.name} holds computed tensors, which cannot be swapped in place "
                                   f"({exc})") from None
            raise AssertionError(f"{case.where}: hotswap_adapter() refused an adapter of the same spec: {exc}") \
                from None
    assert [id(p) for p in model.parameters()] == before, (
        f"{case.where}: hotswap_adapter() replaced parameter objects instead of copying into them")
    assert model.active_adapters == ["default"], f"{case.where}: the swap changed the active adapters"
    out = case.output(model)
    assert torch.equal(out, expected), (f"{case.where}: after hotswap_adapter() the output differs from a fresh "
                                        f"load of the same folder (max diff {_max_diff(out, expected):.3g})")


def _check_merge(case: _Case) -> None:
    """When the method claims merging: merged == unmerged == merge_and_unload (within the tolerance),
    and unmerging restores the base weights. Otherwise merging must be refused with MergeError."""
    import torch

    from peftkit.core.layer import ModulesToSave, TunerLayer

    model = case.adapted()
    model.set_active("default")
    if not case.method.can_merge:
        try:
            model.merge_adapter(["default"])
        except MergeError:
            raise CheckSkipped(f"{case.method.name} does not claim merging (can_merge=False); "
                               f"merge_adapter() refuses it as it should") from None
        raise AssertionError(f"{case.where}: can_merge=False, but merge_adapter() did not refuse")
    weights = {n: p.detach().clone() for n, p in model.base_model.named_parameters()
               if ".adapters." not in n and ".copies." not in n}
    unmerged = case.output(model)
    try:
        model.merge_adapter(["default"])
    except MergeError as exc:  # the method's own check_mergeable() refuses this model, as injection may
        raise CheckSkipped(f"{case.method.name} refuses to merge on {case.tiny.name}: {exc}") from None
    assert model.merged_adapters == ["default"], f"{case.where}: merge_adapter() merged {model.merged_adapters}"
    merged = case.output(model)
    case.close(merged, unmerged, "merged vs unmerged output")
    merged_weights = {n: p.detach().clone() for n, p in model.base_model.named_parameters() if n in weights}
    model.merge_adapter(["default"])  # already merged: must change nothing (never add the change twice)
    changed = [n for n, p in model.base_model.named_parameters() if n in weights and
               not torch.equal(p.detach(), merged_weights[n])]
    assert not changed, f"{case.where}: merging an already merged adapter again changed base weights {changed[:3]}"
    assert torch.equal(case.output(model), merged), f"{case.where}: a second merge_adapter() changed the output"
    assert model.merged_adapters == ["default"], f"{case.where}: after a second merge: {model.merged_adapters}"
    model.unmerge_adapter()
    case.close(case.output(model), unmerged, "output after unmerge vs before merge")
    for name, param in model.base_model.named_parameters():
        if name in weights:
            check_close(param.detach(), weights[name], f"{case.where}: base weight {name} after unmerge",
                        case.options.tolerance)
    bare = model.merge_and_unload(["default"])
    leftovers = [n for n, m in bare.named_modules() if isinstance(m, (TunerLayer, ModulesToSave))]
    assert not leftovers, f"{case.where}: merge_and_unload() left peftkit modules at {leftovers[:3]}"
    case.close(case.output(bare), unmerged, "merge_and_unload() output vs unmerged")


def _check_config(case: _Case) -> None:
    """The config round-trips through JSON and the shorthand, before and after injection
    (when the method fills in values), and its file form is JSON that reads back."""
    import json

    from peftkit.core.plugins import parse_spec

    method, config = case.method, case.config
    record_config = case.adapted(randomized=False).adapter_record("default").config
    for label, cfg in (("the spec's config", config), ("the config filled in at injection", record_config)):
        text = cfg.to_json()
        assert json.loads(text).get("method") == method.name, (
            f"{case.where}: {label}.to_json() does not name method {method.name!r}")
        again = type(cfg).from_json(text)
        assert again == cfg, f"{case.where}: {label} changes through to_json/from_json: {cfg} -> {again}"
        shorthand = cfg.to_shorthand()
        got_method, got = parse_spec(shorthand)
        assert got_method is method, f"{case.where}: shorthand {shorthand!r} names method {got_method.name!r}"
        assert got == cfg, f"{case.where}: {label} changes through the shorthand {shorthand!r}: {got}"
        file_data = method.config_to_file(cfg)
        json.dumps(file_data)  # TypeError: not JSON
        read = method.config_from_file({k: v for k, v in file_data.items()})
        assert isinstance(read, method.config_class), (
            f"{case.where}: config_from_file() returned {type(read).__name__}, not {method.config_class.__name__}")


def _check_peft_config(case: _Case) -> None:
    """A config in PEFT's format (``method.peft_type_of(config)``, by default the method's ``peft_type``)
    promises that Hugging Face PEFT reads the adapter_config.json peftkit saves, and the one PEFT writes back
    (PEFT's own fields: ``bias``, ``fan_in_fan_out``, ``layers_pattern``, ..., and no peftkit.json) loads in
    peftkit as the same adapter: the same sites and a bit-identical output. A config not in PEFT's format (a
    method without ``peft_type``, or a setting PEFT has no field for) must say a ``peft_type`` PEFT does not
    have, so that PEFT refuses its folder rather than load another adapter: checked, then skipped with the
    reason. Skipped too when the ``peft`` package is not installed, or it does not know the type."""
    import json

    from peftkit.core.serialization import CONFIG_NAME

    try:
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING as peft_types
    except ImportError:
        peft_types = {}
    method = case.method
    model = case.adapted()
    peft_type = method.peft_type_of(model.adapter_record("default").config)
    with tempfile.TemporaryDirectory(prefix="peftkit-conformance-") as tmp:
        ours = Path(tmp) / "peftkit"
        model.save_adapter(str(ours), "default")
        written = json.loads((ours / CONFIG_NAME).read_text()).get("peft_type")
        if peft_type is None:
            _check_refused_by_peft(case, written, peft_types)
        assert written == peft_type, (
            f"{case.where}: {method.name}.peft_type_of() says {peft_type!r}, but the {CONFIG_NAME} peftkit saved "
            f"says peft_type {written!r}; config_to_file() must write peft_type_of(config)")
        if not peft_types:
            raise CheckSkipped(f"{case.where} is in PEFT's format ({peft_type}), but the peft package is not "
                               f"installed: pip install peft to check that PEFT's files load")
        if peft_type not in peft_types:
            raise CheckSkipped(f"the installed peft has no peft_type {peft_type!r}")
        _check_peft_round_trip(case, model, ours, peft_types[peft_type])


def _check_refused_by_peft(case: _Case, written: Any, peft_types: Any) -> None:
    """A config not in PEFT's format: its folder's ``peft_type`` must be one PEFT does not have; then skip."""
    from peftkit.core.peft_format import PEFT_TYPES
    from peftkit.core.serialization import CONFIG_NAME

    method = case.method
    assert written not in {*PEFT_TYPES, *peft_types}, (
        f"{case.where}: the config is not in PEFT's format ({method.name}.peft_type_of() is None), but its "
        f"{CONFIG_NAME} says peft_type {written!r}, a type PEFT has: PEFT would load the folder as its own "
        f"{written} adapter, another adapter. Write a type PEFT does not have and list it in the method's "
        f"extra_file_types")
    why = (f"{method.name} declares no peft_type" if method.peft_type is None else
           f"this {method.name} config has a setting PEFT's {method.peft_type} has no field for")
    raise CheckSkipped(f"not in PEFT's format ({why}): its folder says peft_type {written!r}, a type PEFT does "
                       f"not have, so PEFT refuses it")


def _check_peft_round_trip(case: _Case, model: "AdaptedModel", ours: Path, peft_config_class: Any) -> None:
    """PEFT reads the folder ``ours``, writes its config back, and peftkit loads that as the same adapter."""
    import shutil

    import torch

    from peftkit.core.model import AdaptedModel
    from peftkit.core.serialization import CONFIG_NAME, WEIGHTS_NAME

    expected = case.output(model, "default")
    theirs = ours.parent / "peft"
    try:
        peft_config = peft_config_class.from_pretrained(str(ours))
    except Exception as exc:  # PEFT's own validation, whatever it raises
        raise AssertionError(f"{case.where}: PEFT cannot read the {CONFIG_NAME} peftkit saved "
                             f"({type(exc).__name__}: {exc}); config_to_file() must write PEFT's fields") from None
    peft_config.save_pretrained(str(theirs))
    shutil.copyfile(ours / WEIGHTS_NAME, theirs / WEIGHTS_NAME)
    try:
        loaded = AdaptedModel.from_pretrained(case.base(), str(theirs))
    except Exception as exc:
        raise AssertionError(f"{case.where}: the {CONFIG_NAME} PEFT writes for this adapter does not load in "
                             f"peftkit ({type(exc).__name__}: {exc}); config_from_file() must read PEFT's "
                             f"fields (read_peft_fields of the plugin API: fixed= and ignored=), or, for a "
                             f"setting PEFT has no field for, peft_type_of() must say None") from None
    sites, loaded_sites = ({site.name for site in m.adapter_record("default").sites} for m in (model, loaded))
    assert loaded_sites == sites, (
        f"{case.where}: through PEFT's {CONFIG_NAME} the adapter lands on other sites: missing "
        f"{sorted(sites - loaded_sites)[:3]}, extra {sorted(loaded_sites - sites)[:3]}")
    out = case.output(loaded)
    assert torch.equal(out, expected), (
        f"{case.where}: through PEFT's {CONFIG_NAME} the adapter's output changed (max diff "
        f"{_max_diff(out, expected):.3g}): a setting config_to_file() writes is lost or misread on the way "
        f"(PEFT drops fields it does not know; config_from_file() must map PEFT's names back, or peft_type_of() "
        f"must say None for a setting PEFT has no field for)")


def _check_parameter_count(case: _Case) -> None:
    """The adapter's own parameters number exactly ``method.expected_parameter_count()``, and the
    trainable count is that plus its modules_to_save copies."""
    model = case.adapted(randomized=False)
    record = model.adapter_record("default")
    expected = case.method.expected_parameter_count(model.base_model, record.config, record.sites)
    if expected is None:
        raise CheckSkipped(f"{case.method.name} has no expected_parameter_count() formula; implement it so the "
                           f"suite can check the adapter's size")
    own = sum(p.numel() for p in _own_parameters(model, "default"))
    assert own == expected, (f"{case.where}: the adapter has {own} parameters, its method's formula says "
                             f"{expected} ({len(record.sites)} sites)")
    model.train_adapter("default")
    everything = sum(p.numel() for p in model.adapter_parameters("default"))
    assert model.trainable_parameters()[0] == everything, (
        f"{case.where}: {model.trainable_parameters()[0]} trainable parameters, but the adapter (with its "
        f"modules_to_save) has {everything}")


# -- composition blocks ------------------------------------------------------------------------------------------------


def _claims(case: _Case, block: str) -> None:
    if block not in case.method.supported_blocks:
        raise CheckSkipped(f"{case.method.name} does not claim {block}() (supported_blocks: "
                           f"{', '.join(sorted(case.method.supported_blocks)) or 'none'})")


def _check_block_stack(case: _Case) -> None:
    """stack(a) equals a; stack(a, b) differs from a alone and, at every site where both adapters are
    additive, equals the hand sum h + delta_a + delta_b of the adapters' own delta(); with an adapter
    c at its (identity) init, stack(a, c) and stack(c, a) equal a alone."""
    import torch

    from peftkit.core.composition import Stack

    _claims(case, "stack")
    model = case.adapted("a", "b")
    out_a = case.output(model, "a")
    case.close(case.output(model, Stack("a")), out_a, "stack(a) vs a")
    with _site_io(model, ("a", "b")) as seen:
        both = case.output(model, Stack("a", "b"))
    assert torch.isfinite(both).all(), f"{case.where}: stack(a, b) gives NaN or inf"
    assert _differs(both, out_a), f"{case.where}: stack(a, b) equals a alone: b had no effect"
    if case.identity:
        model.add_adapter("c", case.spec)
        case.close(case.output(model, Stack("a", "c")), out_a, "stack(a, c) with c at its identity init vs a")
        case.close(case.output(model, Stack("c", "a")), out_a, "stack(c, a) with c at its identity init vs a")
    _check_stack_sums(case, model, seen)


@contextlib.contextmanager
def _site_io(model: "AdaptedModel", adapters: Sequence[str]) -> Iterator[dict[str, tuple[Any, Any, dict]]]:
    """Record each site's input, output and the input each of ``adapters`` read there (another
    module's input for a Site with ``input_from``) during the forwards run inside the block."""
    from peftkit.core.layer import TunerLayer

    seen: dict[str, tuple[Any, Any, dict]] = {}
    handles = []
    for name, module in model.base_model.named_modules():
        if isinstance(module, TunerLayer):
            def record(layer: Any, args: tuple, output: Any, name: str = name) -> None:
                if args:
                    read = {a: layer.input_of(a, args[0]) for a in adapters if a in layer.adapters}
                    seen[name] = (args[0], output[0] if isinstance(output, tuple) else output, read)
            handles.append(module.register_forward_hook(record))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _check_stack_sums(case: _Case, model: "AdaptedModel", seen: dict[str, tuple[Any, Any, dict]]) -> None:
    """At each site of stack(a, b) where both adapters are additive, the output is
    h + delta_a(x, h) + delta_b(x, h + delta_a(x, h)) with h the base layer's output: each
    adapter's delta() taken by hand, on the output of the one before."""
    import torch

    with torch.no_grad():
        for site, (x, actual, read) in seen.items():
            layer = model.base_model.get_submodule(site)
            parts = [layer.adapters[n] for n in ("a", "b") if n in layer.adapters]
            if len(parts) != 2 or not all(p.additive for p in parts) or not isinstance(x, torch.Tensor):
                continue
            base_out = layer.base_layer(x)
            h = base_out[0] if isinstance(base_out, tuple) else base_out
            for name, adapter in zip(("a", "b"), parts):
                h = h + adapter.delta(read[name], h, layer.base_layer)
            case.close(actual.float(), h.float(), f"stack(a, b) at site {site} vs the hand sum "
                                                  f"h + delta_a + delta_b of the adapters' delta()")


def _check_block_average(case: _Case) -> None:
    """average(a, b) of two adapters with identical weights equals a (also with unequal weights);
    average(a, b, weights=[2, 0]) equals a (weights are normalized once)."""
    from peftkit.core.composition import Average

    _claims(case, "average")
    model = case.adapted("a", "b", "twin")
    _copy_parameters(model, "a", "twin", case.where)
    out_a = case.output(model, "a")
    case.close(case.output(model, Average("a", "twin")), out_a, "average(a, a') of identical adapters vs a")
    case.close(case.output(model, Average("a", "twin", weights=[1.0, 3.0])), out_a,
               "average(a, a', weights=[1, 3]) of identical adapters vs a")
    case.close(case.output(model, Average("a", "b", weights=[2.0, 0.0])), out_a,
               "average(a, b, weights=[2, 0]) vs a")
    assert _differs(case.output(model, Average("a", "b")), out_a), (
        f"{case.where}: average(a, b) equals a alone: b had no effect")


def _check_block_batch_split(case: _Case) -> None:
    """batch_split(a, b, sizes=[1, 1]) and adapter_names=["a", "b"] give each row the output it has
    when its adapter runs on the whole batch."""
    from peftkit.core.composition import BatchSplit

    _claims(case, "batch_split")
    model = case.adapted("a", "b")
    out_a, out_b = case.output(model, "a"), case.output(model, "b")
    assert _differs(out_a[1:], out_b[1:]), f"{case.where}: adapters a and b give the same output"
    split = case.output(model, BatchSplit("a", "b", sizes=[1, 1]))
    case.close(split[:1], out_a[:1], "batch_split(a, b) row 0 vs a")
    case.close(split[1:], out_b[1:], "batch_split(a, b) row 1 vs b")
    model.set_active("a")
    routed = case.output(model, adapter_names=["b", "a"])
    case.close(routed[:1], out_b[:1], 'adapter_names=["b", "a"] row 0 vs b')
    case.close(routed[1:], out_a[1:], 'adapter_names=["b", "a"] row 1 vs a')


def _check_block_split(case: _Case) -> None:
    """split(a, a, splits=[k, T-k]) equals a (the method's output at a token depends on that token
    alone, which claiming split() means); split(a, b) differs from a and from b alone."""
    from peftkit.core.composition import Split

    _claims(case, "split")
    inputs = case.inputs()
    tokens = inputs["input_ids"].shape[1]
    other = inputs.get("decoder_input_ids")
    if other is not None and other.shape[1] != tokens:
        raise CheckSkipped(f"{case.tiny.name}'s decoder reads {other.shape[1]} tokens and its encoder {tokens}: "
                           f"one split() cannot cut both")
    model = case.adapted("a", "b")
    out_a, out_b = case.output(model, "a"), case.output(model, "b")
    assert _differs(out_a, out_b), f"{case.where}: adapters a and b give the same output"
    first = tokens // 2
    try:
        twice = case.output(model, Split("a", "a", splits=[first, tokens - first]))
    except CompositionError as exc:
        if "holds no tokens" not in str(exc):
            raise
        raise CheckSkipped(f"{case.method.name} adapts a module of {case.tiny.name} whose output holds no "
                           f"tokens, where split() is refused: {exc}") from None
    case.close(twice, out_a, "split(a, a) vs a (a method claiming split() must act on each token alone)")
    mixed = case.output(model, Split("a", "b", splits=[first, tokens - first]))
    assert _differs(mixed, out_a) and _differs(mixed, out_b), (
        f"{case.where}: split(a, b) equals one of its adapters alone: a span had no effect")


def _check_block_parallel(case: _Case) -> None:
    """parallel(a, b) gives, in one forward, the outputs of a and b run separately."""
    from peftkit.core.composition import Parallel, split_parallel

    _claims(case, "parallel")
    model = case.adapted("a", "b")
    out_a, out_b = case.output(model, "a"), case.output(model, "b")
    both = case.output(model, Parallel("a", "b"))
    part_a, part_b = split_parallel(both, 2)
    case.close(part_a, out_a, "parallel(a, b) first part vs a")
    case.close(part_b, out_b, "parallel(a, b) second part vs b")


def _check_block_fuse(case: _Case) -> None:
    """A new fusion of a and b starts as their unweighted average, and gives its weights gradients."""
    import torch

    from peftkit.core.composition import Average, Fuse

    _claims(case, "fuse")
    model = case.adapted("a", "b")
    fuse = Fuse("a", "b", name="conformance_ab")
    model.add_fusion(fuse)
    fused = case.output(model, fuse)
    assert torch.isfinite(fused).all(), f"{case.where}: fuse(a, b) gives NaN or inf"
    if "average" in case.method.supported_blocks:
        case.close(fused, case.output(model, Average("a", "b")), "a new fuse(a, b) vs average(a, b)")
    model.train_adapter(fuse)
    model.train()
    output_tensor(model(**case.inputs())).float().pow(2).mean().backward()
    params = list(model.fusion_parameters("conformance_ab"))
    assert params and any(p.grad is not None for p in params), f"{case.where}: fusion weights got no gradient"


def _copy_parameters(model: "AdaptedModel", source: str, target: str, where: str) -> None:
    import torch

    src, dst = list(model.adapter_parameters(source)), list(model.adapter_parameters(target))
    shapes = [tuple(p.shape) for p in src], [tuple(p.shape) for p in dst]
    assert shapes[0] == shapes[1], f"{where}: two adapters of one spec have different parameter shapes"
    with torch.no_grad():
        for s, d in zip(src, dst):
            d.copy_(s)


def _max_diff(a: "torch.Tensor", b: "torch.Tensor") -> float:
    if tuple(a.shape) != tuple(b.shape):
        return math.inf
    return float((a - b).abs().max().item()) if a.numel() else 0.0


_CHECK_FUNCTIONS: dict[str, Callable[[_Case], None]] = {
    "inject": _check_inject,
    "identity": _check_identity,
    "deterministic": _check_deterministic,
    "train_step": _check_train_step,
    "save_load": _check_save_load,
    "hotswap": _check_hotswap,
    "merge": _check_merge,
    "config": _check_config,
    "peft_config": _check_peft_config,
    "parameter_count": _check_parameter_count,
    "block_stack": _check_block_stack,
    "block_average": _check_block_average,
    "block_batch_split": _check_block_batch_split,
    "block_parallel": _check_block_parallel,
    "block_fuse": _check_block_fuse,
    "block_split": _check_block_split,
}
