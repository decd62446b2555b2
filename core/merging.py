"""Weight-space merging: k low-rank adapters become one new, ordinary adapter.

``merge_adapters(model, ["a", "b"], [w_a, w_b], name="m", strategy=...)``
works site by site on the weight changes D_i = s_i B_i A_i (s_i each
adapter's own scale: alpha/r, alpha/sqrt(r) for rsLoRA, per-module
rank/alpha patterns included; on a convolution A and B are flattened to
(r, in * kernel) and (out, r)). The result is a LoRA of rank ``rank`` with
scale 1 (alpha = r, no rsLoRA), whose B A is:

- ``cat``: sum_i w_i D_i exactly, factors concatenated ([B_1 ... B_k],
  [w_1 s_1 A_1; ...]); rank = sum of ranks.
- ``linear``: sum_i w_i D_i exactly (task arithmetic); stored like ``cat``
  unless ``rank`` asks for fewer than the sum of ranks, which makes it ``svd``.
- ``svd``: the best rank-``rank`` approximation of sum_i w_i D_i
  (default rank: the largest member rank).
- a registered dense strategy (``ties``, ``dare_linear``, ``dare_ties``,
  ``magnitude_prune``, or one from a plugin), optionally spelled with PEFT's
  ``_svd`` suffix: the strategy on the dense D_i, then the best
  rank-``rank`` approximation (default: the largest member rank).

The exact weighted sum never forms a dense matrix: with P = [w_i s_i B_i]
(out x R) and Q = [A_i] (R x in), R = sum r_i, sum_i w_i D_i = P Q; thin QR
factorizations P = Q_p R_p and Q^T = Q_q R_q leave an R x R core R_p R_q^T
whose SVD U S V^T gives sum_i w_i D_i = (Q_p U) S (Q_q V)^T. That is
O((out + in) R^2) instead of a dense SVD's O(out * in * min(out, in)).
New factors are B = U_k sqrt(S_k), A = sqrt(S_k) V_k^T.

DoRA adapters merge densely (below): their change at a site,
m / ||W + sBA||_row * (W + sBA) - W, rescales every row of W and is not low
rank, so it is computed from the base weight at hand (the layer adapter's
``delta_weight(base)``, the code a DoRA merge into the base uses). A DoRA
member on a quantized base is refused: its packed weight gives no W to
rescale.

IA3 and BitFit adapters merge elementwise (see :func:`_merge_elementwise`):
v = v_identity + strategy([v_i - v_identity], weights).

Any other mix (LoKr, VeRA, OFT, LoHa, DoRA, ..., or methods mixed together) merges
densely (see :func:`_merge_dense`): each member's dense change at a site is
its layer adapter's ``delta_weight(base)`` (methods declaring
``Method.merge_dense``); the strategy combines them and a truncated SVD
stores the result as a LoRA of rank ``rank`` (default: full rank, exact).
The new record's ``merge_report`` gives, per site, the fraction of the
merged change's energy (squared Frobenius norm) the rank keeps.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import math
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from .composition import BASE_MODEL, Average, Stack, head_leaf
from .errors import MergeError

if TYPE_CHECKING:  # pragma: no cover
    from .layer import TunerLayer
    from .adapted_protocol import AdaptedModelProtocol
    from .state import AdapterRecord

#: Strategies that work on the low-rank factors directly (no dense matrices).
LOW_RANK_STRATEGIES = ("cat", "linear", "svd")


def strategy_names() -> list[str]:
    """Every strategy name merge_adapters() accepts."""
    from .plugins import get_registry

    dense = sorted(get_registry().merge_strategies)
    return list(LOW_RANK_STRATEGIES) + [n for n in dense if n != "linear"] + \
        [f"{n}_svd" for n in dense if n != "linear"]


def _resolve(strategy: str) -> tuple[str, Callable[..., Any] | None]:
    """("cat"|"linear"|"svd", None) or ("dense", fn)."""
    from .plugins import get_registry

    if not isinstance(strategy, str):
        raise MergeError(f"strategy must be a name such as 'svd' or 'ties', not {strategy!r}")
    if strategy in LOW_RANK_STRATEGIES:
        return strategy, None
    if strategy == "linear_svd":
        return "svd", None
    registry = get_registry().merge_strategies
    base = strategy[:-4] if strategy.endswith("_svd") and strategy[:-4] in registry else strategy
    fn = registry.get(base)
    if fn is None:
        close = difflib.get_close_matches(strategy.lower(), strategy_names(), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise MergeError(f"unknown merge strategy {strategy!r}; {hint}available: {', '.join(strategy_names())}")
    return "dense", fn


def _needs(fn: Callable[..., Any], option: str) -> bool:
    try:
        param = inspect.signature(fn).parameters.get(option)
    except (TypeError, ValueError):
        return False
    return param is not None and param.default is inspect.Parameter.empty


# -- the factors of each member at each site ---------------------------------------------------------


def _live_factors(adapter: Any) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(A, B, scale), the live parameters of an adapter whose weight change is scale * B @ A once A and B
    are flattened to (r, in...) and (out, r...): ``low_rank()``, or ``weight_factors()`` where the factors
    are no matrices (LoRA on a convolution: A (r, in, *kernel), B (out, r, 1, ...))."""
    get = getattr(adapter, "weight_factors", None) or getattr(adapter, "low_rank", None)
    return get() if get is not None else None


def _member_factors(model: "AdaptedModelProtocol", names: Sequence[str]) -> list[tuple[str, "TunerLayer", dict]]:
    """[(site, layer, {adapter: (A, B, scale)})] for every site where a member acts, A and B as matrices."""
    out = []
    for site, layer in model.tuner_layers():
        found: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        for name in names:
            if name not in layer.adapters:
                continue
            fac = _live_factors(layer.adapters[name])
            if fac is None:
                record = model.adapter_record(name)
                raise MergeError(f"adapter {name!r} (method {record.method.name!r}) has no low-rank weight change "
                                 f"at {site}; weight-space merging works for LoRA adapters")
            found[name] = (fac[0].flatten(1), fac[1].flatten(1), fac[2])
        if found:
            out.append((site, layer, found))
    return out


# -- combining at one site ------------------------------------------------------------------------------


def _exact_low_rank(terms: list[tuple[torch.Tensor, torch.Tensor, float]], rank: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors (A: rank x in, B: out x rank) of sum_i c_i B_i A_i, via QR + a small SVD."""
    dtype = terms[0][0].dtype
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    p = torch.cat([b.to(work) * c for _, b, c in terms], dim=1)  # out x R
    q = torch.cat([a.to(work) for a, _, _ in terms], dim=0)  # R x in
    q_p, r_p = torch.linalg.qr(p)  # out x m, m x R (Householder: stable even for collinear factors)
    q_q, r_q = torch.linalg.qr(q.t())  # in x n, n x R
    u, s, vh = torch.linalg.svd(r_p.double() @ r_q.double().t(), full_matrices=False)  # m x n core
    k = min(rank, s.shape[0])
    root = s[:k].sqrt()
    b_new = q_p @ (u[:, :k] * root).to(work)
    a_new = (root.unsqueeze(1) * vh[:k]).to(work) @ q_q.t()
    return a_new.to(dtype), b_new.to(dtype)


def _truncated(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors (A: rank x in, B: out x rank) of a dense matrix.

    For a small rank it takes the top eigenpairs of the Gram matrix of the narrower side in
    float64 (M^T M = V S^2 V^T, then U = M V / S), about twice as fast as a thin SVD of M and as
    exact for the singular values that matter; directions whose singular value is negligible
    are left out (zero factors).
    """
    out_f, in_f = delta.shape
    narrow = min(out_f, in_f)
    if rank * 4 > narrow:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        k = min(rank, s.shape[0])
        root = s[:k].sqrt()
        return root.unsqueeze(1) * vh[:k], u[:, :k] * root
    m = delta.double()
    tall = out_f >= in_f
    gram = m.t() @ m if tall else m @ m.t()
    values, vectors = torch.linalg.eigh(gram)  # ascending
    values, vectors = values.flip(0)[:rank], vectors.flip(1)[:, :rank]
    sigma = values.clamp_min(0).sqrt()
    keep = sigma > sigma[0] * 1e-7 if sigma.numel() and sigma[0] > 0 else torch.zeros_like(sigma, dtype=torch.bool)
    inv = torch.where(keep, 1.0 / sigma.clamp_min(1e-300), torch.zeros_like(sigma))
    root = sigma.sqrt() * keep
    if tall:  # vectors = V (in x k); U = M V / S
        u = (m @ vectors) * inv
        a_new, b_new = root.unsqueeze(1) * vectors.t(), u * root
    else:  # vectors = U (out x k); V = M^T U / S
        v = (m.t() @ vectors) * inv
        a_new, b_new = root.unsqueeze(1) * v.t(), vectors * root
    return a_new.to(delta.dtype), b_new.to(delta.dtype)


def _combine_site(kind: str, fn: Callable[..., Any] | None, facs: list[tuple[torch.Tensor, torch.Tensor, float]],
                  weights: list[float], rank: int, options: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "cat" or (kind == "linear" and rank >= sum(a.shape[0] for a, _, _ in facs)):
        a_new = torch.cat([a * (w * s) for (a, _, s), w in zip(facs, weights)], dim=0)
        b_new = torch.cat([b for _, b, _ in facs], dim=1)
        return a_new, b_new
    if kind in ("linear", "svd"):
        return _exact_low_rank([(a, b, w * s) for (a, b, s), w in zip(facs, weights)], rank)
    deltas = [(b @ a) * s for a, b, s in facs]
    assert fn is not None
    merged = fn(deltas, list(weights), **options)
    return _truncated(merged, rank)


def _padded(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    pad = rank - a.shape[0]
    if pad <= 0:
        return a, b
    return torch.cat([a, a.new_zeros(pad, a.shape[1])]), torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)


# -- the API ------------------------------------------------------------------------------------------------


def _members(model: "AdaptedModelProtocol", names: list[str], weights: Sequence[float] | None
             ) -> tuple[list["AdapterRecord"], list[float]]:
    """The records of the adapters to merge and one weight each, refusing what cannot be merged together."""
    if not names:
        raise MergeError("merge_adapters() needs at least one adapter name")
    if len(set(names)) != len(names):
        raise MergeError(f"merge_adapters(): an adapter is listed twice in {names}")
    records = [model.adapter_record(n) for n in names]
    return records, [1.0] * len(names) if weights is None else checked_weights(weights, len(names))


def checked_weights(weights: Sequence[float], count: int) -> list[float]:
    """``weights`` as floats, one per adapter of ``count``; MergeError for another count, a value that is no finite
    number, or a string (a merged adapter's name passed where the weights go)."""
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise MergeError(f"weights must be a list of numbers, one per adapter, not {weights!r} (the merged "
                         f"adapter's name goes in name=...)")
    values = list(weights)
    if len(values) != count:
        raise MergeError(f"{len(values)} weight(s) for {count} adapter(s); give one weight per adapter, in order")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise MergeError(f"weights must be finite numbers, got {value!r}")
    return [float(v) for v in values]


def _reads(fn: Callable[..., Any] | None, option: str) -> bool:
    """Whether a dense strategy reads ``option``: it names the parameter, or takes ``**options`` under another
    name than ``**_`` (the built-in strategies' spelling of "the rest is ignored")."""
    if fn is None:
        return False
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    return option in params or any(p.kind is inspect.Parameter.VAR_KEYWORD and name != "_"
                                   for name, p in params.items())


def _strategies_reading(option: str) -> str:
    """The strategy names that read ``option``, for messages."""
    from .plugins import get_registry

    return ", ".join(sorted(n for n, fn in get_registry().merge_strategies.items() if _reads(fn, option)))


def _strategy_options(strategy: str, kind: str, fn: Callable[..., Any] | None, density: float | None,
                      majority_sign_method: str | None) -> dict[str, Any]:
    """The options handed to a dense strategy, checked: an option the strategy does not read is refused (PEFT
    ignores it silently, so a typo in the strategy name or a forgotten switch went unnoticed). A sign election
    not given (None) is "total" where a strategy elects signs."""
    options: dict[str, Any] = {"majority_sign_method": majority_sign_method or "total"}
    if majority_sign_method not in (None, "total", "frequency"):
        raise MergeError(f"majority_sign_method must be 'total' or 'frequency', not {majority_sign_method!r}")
    reads = kind == "dense" and _reads(fn, "density")
    if majority_sign_method is not None and not (kind == "dense" and _reads(fn, "majority_sign_method")):
        raise MergeError(f"majority_sign_method={majority_sign_method!r} has no effect on strategy {strategy!r}; "
                         f"it elects signs in {_strategies_reading('majority_sign_method')} (and their _svd forms): "
                         f"drop it (peftkit merge: --majority-sign) or pick one of those")
    if density is not None:
        if not isinstance(density, (int, float)) or isinstance(density, bool) or not 0.0 < density <= 1.0:
            raise MergeError(f"density is the fraction of entries to keep, a number in (0, 1] (0 keeps none and "
                             f"the merged adapter would change nothing), got {density!r}")
        if not reads:
            raise MergeError(f"density={density} has no effect on strategy {strategy!r}; it is read by "
                             f"{_strategies_reading('density')} (and their _svd forms): drop density= (peftkit merge: "
                             f"--density) or pick one of those")
        options["density"] = float(density)
    elif reads and _needs(fn, "density"):
        raise MergeError(f"strategy {strategy!r} needs density=<fraction of entries to keep>, e.g. density=0.5 "
                         f"(peftkit merge: --density 0.5)")
    return options


def check_merge_options(strategy: str, density: float | None = None, rank: int | None = None,
                        majority_sign_method: str | None = None) -> None:
    """Raise MergeError for the options :func:`merge_adapters` would refuse whatever the adapters (an unknown
    strategy, a density or sign election the strategy does not read, a bad rank), so a command can refuse
    them before it downloads or loads anything."""
    _checked_options(strategy, density, rank, majority_sign_method)


def _checked_options(strategy: str, density: float | None, rank: int | None, majority_sign_method: str | None
                     ) -> tuple[str, Callable[..., Any] | None, dict[str, Any]]:
    kind, fn = _resolve(strategy)
    options = _strategy_options(strategy, kind, fn, density, majority_sign_method)
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0):
        raise MergeError(f"rank must be a positive integer, got {rank!r}")
    return kind, fn, options


def merge_adapters(model: "AdaptedModelProtocol", adapters: Sequence[str], weights: Sequence[float] | None = None,
                   name: str = "merged", strategy: str = "svd", *, density: float | None = None,
                   rank: int | None = None, majority_sign_method: str | None = None, seed: int | None = 0,
                   modules_to_save: str | None = None) -> "AdapterRecord":
    """Merge adapters in weight space into a new adapter ``name`` (see the module doc): LoRA factors, IA3/BitFit
    values elementwise, any other method (or a mix, or DoRA, whose change depends on the base weight) through
    its dense weight changes into a LoRA.

    weights: one per adapter (default 1.0 each; negative subtracts).
    density: fraction of entries kept by ties / dare_* / magnitude_prune.
    majority_sign_method: how ties / dare_ties elect each entry's sign, "total" (the default there) or
      "frequency"; given to a strategy that elects no signs, it is refused.
    rank: rank of the new adapter (defaults: cat/linear sum of ranks, others the largest rank; a dense merge:
      full rank, exact; its record's ``merge_report`` gives the energy a smaller rank keeps per site).
    seed: seeds DARE's random drop (None: torch's global generator, as PEFT).
    modules_to_save: when several members keep their own copy of a module (a task head):
      "average" (weighted average of the copies) or the name of the member whose copy to keep.

    The new adapter is added inactive and frozen, like add_adapter(). On any error the model is
    left as it was.
    """
    names = list(adapters) if not isinstance(adapters, str) else [adapters]
    records, weights = _members(model, names, weights)
    for record in records:
        beyond = beyond_weight_change(record.config)
        if beyond:
            raise MergeError(f"adapter {record.name!r} {beyond}, and a merged adapter holds weight changes only "
                             f"(PEFT's add_weighted_adapter drops the rest); merge it into the base model instead "
                             f"(merge_and_unload), or compose it: average(...)")
    model.check_adapter_name(name)
    kind, fn, options = _checked_options(strategy, density, rank, majority_sign_method)
    for record in records:
        if record.model_adapter:
            raise MergeError(f"adapter {record.name!r} changes the model's inputs and has no layer weights to "
                             f"merge; compose it instead, e.g. stack({record.name}, ...)")
    if len({r.method.name for r in records}) == 1 and _elementwise(records[0]):
        return _merge_elementwise(model, names, records, weights, name, strategy, kind, fn, options, seed,
                                  modules_to_save)
    if len(names) == 1 and kind == "dense":
        kind, fn = "svd", None  # one adapter: there is nothing to trim against (PEFT does the same)

    if not all(r.method.merge_low_rank and not _uses_dora(r) for r in records):
        return _merge_dense(model, names, records, weights, name, kind, fn, rank, options, seed, modules_to_save)
    for record in records:
        _check_mergeable(record)
    sites = _member_factors(model, names)
    if not sites:
        raise MergeError(f"adapters {names} act at no layer; nothing to merge")
    ranks = [max(a.shape[0] for a, _, _ in facs.values()) for _, _, facs in sites]
    site_sums = [sum(a.shape[0] for a, _, _ in facs.values()) for _, _, facs in sites]
    if rank is None:
        rank = max(site_sums) if kind in ("cat", "linear") else max(ranks)
    if kind == "cat" and rank < max(site_sums):
        raise MergeError(f"strategy 'cat' keeps every factor, so the rank is the sum of ranks ({max(site_sums)}); "
                         f"use strategy='svd' with rank={rank} to truncate (peftkit merge: --strategy svd "
                         f"--rank {rank})")

    generator = None
    if kind == "dense" and seed is not None:
        device = next(iter(sites[0][2].values()))[0].device
        generator = torch.Generator(device=device)
        generator.manual_seed(int(seed))
    options["generator"] = generator

    merged: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        for site, _, facs in sites:
            members = [n for n in names if n in facs]
            a_new, b_new = _combine_site(kind, fn, [facs[n] for n in members],
                                         [weights[names.index(n)] for n in members], rank, options)
            merged[site] = _padded(a_new, b_new, rank)

    config = _merged_config(records[0], rank, [site for site, _, _ in sites], records, modules_to_save)
    return _add_merged(model, name, config, merged, records, weights, modules_to_save)


def _add_merged(model: "AdaptedModelProtocol", name: str, config: Any,
                merged: dict[str, tuple[torch.Tensor, torch.Tensor]],
                records: list["AdapterRecord"], weights: list[float], modules_to_save: str | None
                ) -> "AdapterRecord":
    """Add the new LoRA adapter ``name`` holding the merged factors; on any error the model is left as it was."""
    record = model.add_adapter(name, config)
    try:
        _write_factors(model, name, merged)
        _fill_modules_to_save(model, name, records, weights, modules_to_save)
    except BaseException:
        model.delete_adapter(name)
        raise
    return record


# -- dense weight changes (any method whose layer adapters give delta_weight) ---------------------------

def _dense_refusal(record: "AdapterRecord", records: list["AdapterRecord"], why: str) -> MergeError:
    methods = sorted({r.method.name for r in records})
    mix = f"adapters of different methods ({', '.join(methods)}) merge through their dense weight changes, " \
        if len(methods) > 1 else ""
    return MergeError(f"{mix}adapter {record.name!r} (method {record.method.name!r}) {why}, so it cannot become "
                      f"part of a LoRA; compose it instead: average(...) or fuse(...)")


def beyond_weight_change(config: Any) -> str | None:
    """What a LoRA config changes besides its layers' weights, for messages ("has lora_bias=true: ..."), or None:
    B's bias (lora_bias) or embedding rows (trainable_token_indices). A merged adapter holds weight changes only."""
    if getattr(config, "lora_bias", False):
        return "has lora_bias=true: it changes its layers' biases as well as their weights"
    if getattr(config, "trainable_token_indices", None) is not None:
        return "has trainable_token_indices: it replaces embedding rows as well as changing weights"
    return None


def _uses_dora(record: "AdapterRecord") -> bool:
    """Whether the adapter is a DoRA: its weight change rescales the base weight's rows (no low-rank factors)."""
    return bool(getattr(record.config, "use_dora", False))


def _member_dense_deltas(model: "AdaptedModelProtocol", names: list[str], records: list["AdapterRecord"]
                         ) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """(site, {adapter: dense weight change as an (out, in * kernel) float matrix}) where a member acts, one site
    at a time (only one site's dense matrices are held at once)."""
    from .base_layers import is_conv1d, quantization_of

    by_name = dict(zip(names, records))
    for site, layer in model.tuner_layers():
        found: dict[str, torch.Tensor] = {}
        for name in names:
            if name not in layer.adapters:
                continue
            quantized = quantization_of(layer.base_layer)
            if quantized and layer.adapters[name].merge_reads_weight:
                raise _dense_refusal(by_name[name], records,
                                     f"changes {site} by rescaling its base weight, which is quantized ({quantized}) "
                                     f"and gives no dense weight to rescale")
            if layer.merged and layer.adapters[name].merge_reads_weight:
                raise MergeError(f"adapter {name!r}'s weight change at {site} is computed from the base weight, "
                                 f"which holds merged adapter(s) {', '.join(layer.merged)}; unmerge them first "
                                 f"(model.unmerge_adapter())")
            try:
                delta = layer.adapters[name].delta_weight(layer.base_layer).detach()
            except (MergeError, NotImplementedError) as exc:
                raise _dense_refusal(by_name[name], records, f"gives no weight change at {site} ({exc})") from exc
            if is_conv1d(layer.base_layer):
                delta = delta.t()
            work = torch.float32 if delta.dtype in (torch.float16, torch.bfloat16) else delta.dtype
            found[name] = delta.flatten(1).to(work)
        if found:
            yield site, found


def _low_rank_target() -> Any:
    """The loaded method that holds a dense merge's result: the first declaring ``merge_low_rank``."""
    from .plugins import get_registry

    for method in get_registry().methods.values():
        if method.merge_low_rank:
            return method
    raise MergeError("a dense merge is stored as a low-rank adapter, but no loaded method declares merge_low_rank "
                     "(load the lora plugin)")


def _merge_dense(model: "AdaptedModelProtocol", names: list[str], records: list["AdapterRecord"], weights: list[float],
                 name: str, kind: str, fn: Callable[..., Any] | None, rank: int | None, options: dict[str, Any],
                 seed: int | None, modules_to_save: str | None) -> "AdapterRecord":
    """strategy([delta_weight_i], weights) per site, stored as a LoRA of rank ``rank`` (truncated SVD)."""
    from .plugins import get_registry

    for record in records:
        if not record.method.merge_dense:
            raise _dense_refusal(record, records, "declares that its delta_weight is not its whole effect")
    target = _low_rank_target()
    if kind != "dense":
        if kind == "cat":
            raise MergeError(f"strategy 'cat' concatenates low-rank factors, which {_without_factors(records)} "
                             f"lack; use strategy='linear' (exact at full rank) or 'svd' with rank=<r>")
        fn = get_registry().merge_strategies["linear"]
    merged: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    report: dict[str, float] = {}
    assert fn is not None
    with torch.no_grad():
        for site, found in _member_dense_deltas(model, names, records):
            if "generator" not in options:
                generator = None
                if seed is not None:
                    generator = torch.Generator(device=next(iter(found.values())).device)
                    generator.manual_seed(int(seed))
                options = {**options, "generator": generator}
            members = [n for n in names if n in found]
            combined = fn([found[n] for n in members], [weights[names.index(n)] for n in members], **options)
            a_new, b_new = _truncated(combined, min(combined.shape) if rank is None else rank)
            total = float(combined.double().square().sum())
            kept = float((b_new.double() @ a_new.double()).square().sum())
            report[site] = 1.0 if total == 0 else min(1.0, kept / total)
            merged[site] = (a_new, b_new)
    if not merged:
        raise MergeError(f"adapters {names} act at no layer; nothing to merge")
    if rank is None:  # full rank: exact everywhere
        rank = max(a.shape[0] for a, _ in merged.values())
    merged = {site: _padded(a, b, rank) for site, (a, b) in merged.items()}
    heads = sorted({m for r in records for m in r.modules_to_save})
    config = target.make_config(r=rank, alpha=float(rank), target_modules=list(merged),
                                modules_to_save=heads or None)
    record = _add_merged(model, name, config, merged, records, weights, modules_to_save)
    record.merge_report = {"rank": rank, "energy_kept": report}
    return record


def _without_factors(records: list["AdapterRecord"]) -> str:
    """The members that have no low-rank factors, each with why, for messages: "d (DoRA: ...)"."""
    parts = [f"{r.name} (DoRA: its change rescales the base weight's rows)" if _uses_dora(r) else
             f"{r.name} ({r.method.name})" for r in records if _uses_dora(r) or not r.method.merge_low_rank]
    return ", ".join(parts)


def _check_mergeable(record: "AdapterRecord") -> None:
    config = record.config
    needed = ("r", "alpha", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern")
    if not record.method.merge_low_rank or not all(hasattr(config, f) for f in needed):
        raise MergeError(f"adapter {record.name!r} uses method {record.method.name!r}, whose parameters do not "
                         f"add up in weight space (merging works for {_mergeable_methods()}); compose it "
                         f"instead: average(...) or fuse(...)")


def _mergeable_methods() -> str:
    """The loaded methods that weight-space merging serves, for messages: "lora, and elementwise for ia3"."""
    from .plugins import get_registry

    methods = get_registry().methods.values()
    low_rank = sorted(m.name for m in methods if m.merge_low_rank)
    elementwise = sorted(m.name for m in methods if m.merge_elementwise)
    text = ", ".join(low_rank) or "no loaded method"
    return text + (f", and elementwise for {', '.join(elementwise)}" if elementwise else "")


# -- elementwise methods (IA3 scaling vectors, BitFit bias deltas) ----------------------------------------

def _elementwise(record: "AdapterRecord") -> bool:
    """Whether the method's parameters are per-channel values with a meaningful sum (``Method.merge_elementwise``):
    the merged value is identity + strategy(value_i - identity)."""
    return bool(record.method.merge_elementwise)


def _merge_elementwise(model: "AdaptedModelProtocol", names: list[str], records: list["AdapterRecord"],
                       weights: list[float], name: str, strategy: str, kind: str, fn: Callable[..., Any] | None,
                       options: dict[str, Any], seed: int | None, modules_to_save: str | None) -> "AdapterRecord":
    """v = v_identity + strategy([v_i - v_identity], weights) for every tensor at every site.

    For IA3 (identity 1) ``linear`` gives 1 + sum_i w_i (l_i - 1), which is PEFT's sum_i w_i l_i when the
    weights sum to 1; for BitFit (identity 0) it is sum_i w_i b_i, exactly the weighted sum of the members'
    effects.
    """
    from .plugins import get_registry

    method = records[0].method
    if kind in ("cat", "svd"):
        raise MergeError(f"strategy {strategy!r} combines low-rank factors; {method.name} adapters merge "
                         f"elementwise with linear, ties, dare_linear, dare_ties or magnitude_prune")
    if kind == "linear":
        fn = get_registry().merge_strategies["linear"]
    sites = [sorted(s.name for s in r.sites) for r in records]
    if any(s != sites[0] for s in sites):
        raise MergeError(f"{method.name} adapters {', '.join(names)} act at different layers; elementwise merging "
                         f"needs the same target modules (compose them with average(...) instead)")
    config = records[0].config
    for flag in ("init_weights", "init_ia3_weights"):  # the new adapter must start at the identity
        if getattr(config, flag, True) is not True:
            config = config.replace(**{flag: True})
    if not method.identity_at_init:
        raise MergeError(f"method {method.name!r} does not start at the identity, so its parameters have no "
                         f"reference to merge against")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device)
        generator.manual_seed(int(seed))
    options = {**options, "generator": generator}
    record = model.add_adapter(name, config)
    try:
        with torch.no_grad():
            for _, layer in model.tuner_layers():
                if name not in layer.adapters:
                    continue
                members = [layer.adapters[n].tensors() for n in names]
                for key, target in layer.adapters[name].tensors().items():
                    identity = target.detach().clone()
                    deltas = [m[key].detach().to(identity.dtype) - identity for m in members]
                    assert fn is not None
                    target.copy_(identity + fn(deltas, list(weights), **options))
        _fill_modules_to_save(model, name, records, weights, modules_to_save)
    except BaseException:
        model.delete_adapter(name)
        raise
    return record


def _merged_config(first: "AdapterRecord", rank: int, sites: list[str], records: list["AdapterRecord"],
                   modules_to_save: str | None) -> Any:
    heads = sorted({m for r in records for m in r.modules_to_save})
    return first.config.replace(
        r=rank, alpha=float(rank), use_rslora=False, use_dora=False, rank_pattern={}, alpha_pattern={},
        target_modules=list(sites), exclude_modules=None, layers_to_transform=None,
        modules_to_save=heads or None, init_weights=True)


def _write_factors(model: "AdaptedModelProtocol", name: str, merged: dict[str, tuple[torch.Tensor,
                   torch.Tensor]]) -> None:
    written = set()
    with torch.no_grad():
        for site, layer in model.tuner_layers():
            if name not in layer.adapters:
                continue
            if site not in merged:
                raise MergeError(f"internal: the merged adapter has a module at {site} but no merged weights")
            a_live, b_live, scale = _live_factors(layer.adapters[name])
            a_new, b_new = merged[site]
            if tuple(a_live.flatten(1).shape) != tuple(a_new.shape) or \
                    tuple(b_live.flatten(1).shape) != tuple(b_new.shape):
                raise MergeError(f"internal: merged factors at {site} have shapes {tuple(a_new.shape)}, "
                                 f"{tuple(b_new.shape)}; the new adapter has {tuple(a_live.shape)}, "
                                 f"{tuple(b_live.shape)}")
            # A fresh adapter: take the new tensors as the parameters' storage (no copy).
            a_live.data = a_new.reshape(a_live.shape).to(device=a_live.device, dtype=a_live.dtype).contiguous()
            b_new = (b_new if scale == 1.0 else b_new / scale).reshape(b_live.shape)
            b_live.data = b_new.to(device=b_live.device, dtype=b_live.dtype).contiguous()
            written.add(site)
    missing = sorted(set(merged) - written)
    if missing:
        raise MergeError(f"the merged adapter could not be placed at {', '.join(missing[:5])}")


def _fill_modules_to_save(model: "AdaptedModelProtocol", name: str, records: list["AdapterRecord"],
                          weights: list[float],
                          choice: str | None) -> None:
    from .heads import describe_labels
    from .layer import ModulesToSave

    member_names = [r.name for r in records]
    if choice is not None and choice != "average" and choice not in member_names:
        raise MergeError(f"modules_to_save={choice!r}: give 'average' or one of the merged adapters "
                         f"({', '.join(member_names)})")
    labels = {n: model.adapter_labels(n) for n in member_names}
    for module_name, module in list(model.base_model.named_modules()):
        if not isinstance(module, ModulesToSave) or name not in module.copies:
            continue
        holders = [(n, w) for n, w in zip(member_names, weights) if n in module.copies]
        if not holders:
            continue  # the new adapter's copy starts from the original module
        if choice is None and len(holders) > 1:
            raise MergeError(f"adapters {', '.join(n for n, _ in holders)} each keep their own copy of "
                             f"{module_name!r}; pass modules_to_save='average' or the name of the adapter "
                             f"whose copy the merged adapter keeps (peftkit merge: --head average or --head NAME)")
        source = choice if choice in dict(holders) else holders[0][0]
        named = {n: labels[n] for n, _ in holders if labels[n] is not None}
        if choice == "average" and len({tuple(v) for v in named.values()}) > 1:
            raise MergeError(f"modules_to_save='average': the classification heads predict different labels "
                             f"({describe_labels(named)}) and cannot be averaged; pass the name of the adapter "
                             f"whose head the merged adapter keeps (peftkit merge: --head NAME)")
        target = copy.deepcopy(module.copies[source])  # its shape: a head may have other labels than the model's
        target.requires_grad_(False)
        module.copies[name] = target
        model.adapter_record(name).labels = labels[source]
        if choice == "average":
            if not any(w for _, w in holders):
                raise MergeError(f"modules_to_save='average': the adapters holding copies of {module_name!r} "
                                 f"({', '.join(f'{n} {w:g}' for n, w in holders)}) all have weight 0, so they have "
                                 f"no weighted average; pass the name of the adapter whose copy the merged adapter "
                                 f"keeps (peftkit merge: --head NAME)")
            average_copies(module, [n for n, _ in holders], [w for _, w in holders], name)


def average_copies(module: Any, members: Sequence[str], weights: Sequence[float], name: str) -> None:
    """Set ``name``'s copy of a saved module (``ModulesToSave``: a task head) to the members' copies averaged
    with shares ``|w_i| / sum_j |w_j|``: a negative weight subtracts a member's change to the layers, but a
    head averaged with it would be extrapolated (weights 1, -0.5 would give 2 a - b), so it counts by its
    size. Integer tensors (counters) are the first member's."""
    norm = sum(abs(float(w)) for w in weights)
    states = [(module.copies[m].state_dict(), abs(float(w)) / norm) for m, w in zip(members, weights)]
    merged = {key: sum(state[key] * share for state, share in states) if first.is_floating_point() else first
              for key, first in states[0][0].items()}
    module.copies[name].load_state_dict(merged)


# -- merging a composition ------------------------------------------------------------------------------


#: The name an average() folded into one adapter gets (with a number when taken).
FOLDED_AVERAGE = "merged_average"


def merge_order(model: "AdaptedModelProtocol", node: Any) -> list[str]:
    """The adapters that ``merge_and_unload`` folds into the base weights to merge composition ``node``, in order:
    one adapter, a ``stack()``'s adapters, and an ``average()`` of adapters whose changes are low-rank weight
    changes (LoRA without DoRA) first merged into one new adapter on ``model``: the exact weighted sum of their
    changes (``linear``, with the block's normalized weights; ``__base__`` adds nothing), keeping the head the
    average predicts with (its first member's). ``merge_and_unload`` keeps the last one's head, so a stack's
    ``head=`` must name the last adapter with a head. Anything else mixes outputs at run time (MergeError)."""
    if isinstance(node, str):
        return [] if node == BASE_MODEL else [node]
    if isinstance(node, Stack):
        names = [name for child in node.children for name in merge_order(model, child)]
        last = next((n for n in reversed(names) if model.adapter_record(n).modules_to_save), None)
        if node.head is not None and node.head != last:
            raise MergeError(f"{node} predicts with {node.head}'s head, but merged adapters keep the last one's "
                             f"({last}); put {node.head} last in the stack, or save it without merging")
        return names
    if isinstance(node, Average) and all(isinstance(child, str) for child in node.children):
        return [_fold_average(model, node)]
    raise MergeError(f"{node} cannot be merged into the base weights: only one adapter, a stack() of adapters or "
                     f"an average() of LoRA adapters is the same model once merged ({node.kind}() mixes outputs "
                     f"at run time); save it without merging")


def _fold_average(model: "AdaptedModelProtocol", block: Any) -> str:
    pairs = [(c, w) for c, w in zip(block.children, block.normalized_weights()) if c != BASE_MODEL]
    for member, _ in pairs:
        record = model.adapter_record(member)
        beyond = beyond_weight_change(record.config)
        if not record.method.merge_low_rank or _uses_dora(record) or beyond:
            why = beyond or ("uses DoRA" if _uses_dora(record) else "has no low-rank weight change")
            raise MergeError(f"{block}: {member} ({record.method.name}) {why}, so the average "
                             f"is not one weight change for any weights (only LoRA changes, without DoRA, lora_bias "
                             f"or trainable_token_indices, add up exactly); save it without merging")
    name, number = FOLDED_AVERAGE, 1
    while name in model.adapters:
        number += 1
        name = f"{FOLDED_AVERAGE}_{number}"
    owner = head_leaf(block, lambda n: bool(model.adapter_record(n).modules_to_save))
    merge_adapters(model, [m for m, _ in pairs], [w for _, w in pairs], name=name, strategy="linear",
                   modules_to_save=owner)
    return name
