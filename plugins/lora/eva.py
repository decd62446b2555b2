"""EVA (Explained Variance Adaptation, arXiv 2410.07170): LoRA's A starts at the top right singular
vectors of each layer's inputs, computed from a few batches, and the rank budget moves to the layers
whose inputs those directions explain best. B starts at zero, so the model starts equal to the base.

As PEFT's ``initialize_lora_eva_weights``: an incremental SVD (incremental_pca.py) of every adapted
linear layer's inputs (padding and, with ``eva_use_label_mask``, label-masked positions left out) runs
over the batches, cycling, until each layer's top components stop moving (cosine similarity of
consecutive steps >= ``eva_tau``); layers that get the very same inputs share one SVD. Each layer may
take up to ``r * eva_rho`` components; the sum of the layers' ranks is kept and handed out by explained
variance ratio. A layer left with rank 0 loses its adapter. The new ranks (and alphas, with
``eva_adjust_scaling_factors``) go into the config's rank_pattern / alpha_pattern, so the saved adapter
loads in PEFT.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import torch

from peftkit.plugin_api import base_of, ConfigError, layer_adapters_of, pattern_value

from .eva_sync import EvaSync
from .incremental_pca import IncrementalPCA

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from .config import LoraConfig

#: The most batches EVA runs before it gives up on convergence (each a forward pass of the model).
MAX_BATCHES = 200


def initialize_eva(model: Any, batches: Iterable[Mapping[str, Any]], adapter_name: str = "default", *,
                   forward: Callable[[Any, Mapping[str, Any]], Any] | None = None,
                   max_batches: int = MAX_BATCHES) -> dict[str, int]:
    """Initialise LoRA adapter ``adapter_name`` of ``model`` (an AdaptedModel, adapter created with
    ``init_weights="eva"``) from ``batches``: dicts of model inputs such as a DataLoader gives
    (``input_ids``, ``attention_mask``, optionally ``labels``). ``forward(model, batch)`` runs the
    model (default: ``model(**batch)``). Returns the new rank of each adapted layer."""
    from .config import LoraConfig

    record = model.adapter_record(adapter_name)
    config = record.config
    if not isinstance(config, LoraConfig) or config.init_weights != "eva":
        raise ConfigError(f"initialize_eva: adapter {adapter_name!r} is not a LoRA created with init_weights=\"eva\" "
                          f"(e.g. lora[init=eva]); EVA sets the starting factors of such an adapter")
    layers = eva_layers(model, adapter_name)
    if not layers:
        raise ConfigError(f"initialize_eva: adapter {adapter_name!r} has no linear layer EVA can initialise "
                          f"(EVA sets LoRA's A on Linear layers; embeddings, convolutions and parameters keep "
                          f"the ordinary init)")
    if any(adapter_name in getattr(model.base_model.get_submodule(site), "merged", ()) for site in layers):
        raise ConfigError(f"initialize_eva: adapter {adapter_name!r} is merged into the base weights; unmerge it "
                          f"(model.unmerge_adapter()) before EVA sets its factors")
    run = forward or (lambda m, batch: m(**batch))
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), model.disable_adapters():
            components = _components(model, layers, batches, config, run, max_batches)
    finally:
        model.train(training)
    return _apply(model, record, layers, components)


def eva_layers(model: Any, adapter_name: str) -> dict[str, Any]:
    """Site -> LoRA module on a linear layer (the layers EVA initialises)."""
    from .layer import LoraLinear

    return {site: layer for site, layer in layer_adapters_of(model, adapter_name).items()
            if isinstance(layer, LoraLinear)}


class _Inputs:
    """Forward hook keeping the rows of a layer's input EVA uses: the positions ``mask`` keeps when
    the input is (batch, sequence, features) like the mask, otherwise every row."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None

    def __call__(self, _module: "nn.Module", args: tuple, kwargs: dict, _output: Any) -> None:
        x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        if x is None:
            return
        if self.mask is not None and x.dim() == 3 and x.shape[:2] == self.mask.shape:
            x = x[self.mask]
        self.rows = x.reshape(-1, x.shape[-1])


def _position_mask(batch: Mapping[str, Any], config: "LoraConfig") -> torch.Tensor | None:
    """The (batch, sequence) positions whose layer inputs EVA reads: not padding, and with
    eva_use_label_mask not labelled ``eva_label_mask_value`` (PEFT's language-modeling rule)."""
    ids = batch.get("input_ids")
    mask = batch.get("attention_mask")
    if mask is None:
        if not isinstance(ids, torch.Tensor):
            return None
        mask = torch.ones_like(ids)
    mask = mask.bool()
    labels = batch.get("labels")
    if config.eva_use_label_mask and isinstance(labels, torch.Tensor) and labels.shape == mask.shape:
        mask = mask & (labels != config.eva_label_mask_value)
    return mask


def _on_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _fingerprint(rows: torch.Tensor) -> str:
    return hashlib.sha256(rows.detach().to("cpu").contiguous().numpy().tobytes()).hexdigest()


def _components(model: Any, layers: dict[str, Any], batches: Iterable[Mapping[str, Any]], config: "LoraConfig",
                run: Callable[[Any, Mapping[str, Any]], Any], max_batches: int) -> dict[str, torch.Tensor]:
    """Site -> its EVA rows of A (rank x in), the rank as redistributed."""
    device = next(model.base_model.parameters()).device
    sync = EvaSync()
    batch_iter = iter(batches)
    first = next(batch_iter, None)
    failure = None
    if first is None:
        failure = ("initialize_eva: no batches given; pass a few batches of model inputs "
                   "(dicts with input_ids and attention_mask, e.g. a DataLoader)")
    elif not isinstance(first, Mapping):
        failure = (f"initialize_eva: a batch must be a dict of model inputs (input_ids, attention_mask, "
                   f"...), not {type(first).__name__}")
    _raise_first(sync, failure)
    cycled = itertools.cycle(itertools.chain([first], batch_iter))
    bases = {site: base_of(model.base_model.get_submodule(site)) for site in layers}
    hooks = {site: _Inputs() for site in layers}
    # Under torchrun every process runs the model on its own batches, and the main process alone fits the
    # SVDs on the gathered inputs and decides (eva_sync.py); the others follow what it shares.
    fit = _Fit(layers, config, max_batches) if sync.leader else None
    if fit is not None:
        try:
            fit.start(_shared_inputs(model, bases, hooks, _on_device(first, device), config, run))
        except ConfigError as error:
            failure = str(error)
    _raise_first(sync, failure)
    for count, batch in enumerate(cycled):
        step = sync.share(fit.next_step(count) if fit is not None else None)
        if isinstance(step, str):
            raise ConfigError(step)
        if step is None:
            break
        batch = _on_device(batch, device)
        active = {s: hooks[s] for s in step}
        _run_with_hooks(model, bases, active, batch, _position_mask(batch, config), run)
        rows = sync.gather_rows({site: hook.rows for site, hook in active.items()})
        if fit is not None:
            fit.step(rows)
    return sync.share({site: rows.cpu() for site, rows in fit.rows().items()} if fit is not None else None)


def _raise_first(sync: EvaSync, failure: str | None) -> None:
    """Raise a process's error on every process (none waits for the others forever)."""
    failure = sync.first_failure(failure)
    if failure is not None:
        raise ConfigError(failure)


class _Fit:
    """The incremental SVDs of the layers' inputs and the rank budget handed out over them."""

    def __init__(self, layers: dict[str, Any], config: "LoraConfig", max_batches: int) -> None:
        self.layers = layers
        self.config = config
        self.max_batches = max_batches
        ranks = {site: pattern_value(site, config.rank_pattern, config.r) for site in layers}
        self.budget = sum(ranks.values())
        self.most = {site: round(r * config.eva_rho) for site, r in ranks.items()}

    def start(self, owner_of: dict[str, str]) -> None:
        most = self.most
        for site, owner in owner_of.items():
            most[owner] = max(most[owner], most[site])
        for site, owner in owner_of.items():
            most[site] = most[owner]
        self.owner_of = owner_of
        self.owners = [site for site in self.layers if owner_of[site] == site]
        self.svds = {site: IncrementalPCA(most[site]) for site in self.owners}
        self.converged = {site: torch.zeros(most[site], dtype=torch.bool) for site in self.owners}
        self.rank_of = dict(most)

    def next_step(self, count: int) -> list[str] | str | None:
        """The layers still to fit on the next batch; None when all converged, an error message when
        they did not within max_batches."""
        # a layer asked for more components than have converged runs again
        waiting = [s for s in self.owners if not bool(torch.all(self.converged[s][:self.rank_of[s]]))]
        if not waiting:
            return None
        if count >= self.max_batches:
            return (f"initialize_eva: the SVD of {len(waiting)} layer(s) (e.g. {waiting[0]}) did not converge "
                    f"within {self.max_batches} batches; lower eva_tau (now {self.config.eva_tau}), give more or "
                    f"larger batches, or lower eva_rho")
        return waiting

    def step(self, rows: dict[str, torch.Tensor | None]) -> None:
        for site, found in rows.items():
            if found is not None:
                _fit_step(self.svds[site], found, self.converged, site, self.config.eva_tau)
        if all(svd.components is not None for svd in self.svds.values()):
            self.rank_of = _distribute(self.svds, self.owner_of, self.most, self.budget)

    def rows(self) -> dict[str, torch.Tensor]:
        """Site -> its EVA rows of A (rank x in), the rank as redistributed."""
        out = {}
        for site in self.layers:
            svd = self.svds[self.owner_of[site]]
            assert svd.components is not None and svd.singular_values is not None
            rows = svd.components[:self.rank_of[site]].clone()
            if self.config.eva_whiten:
                rows /= svd.singular_values[:self.rank_of[site]].sqrt().reshape(-1, 1)
            out[site] = rows
        return out


def _shared_inputs(model: Any, bases: dict[str, Any], hooks: dict[str, _Inputs], batch: Mapping[str, Any],
                   config: "LoraConfig", run: Callable[[Any, Mapping[str, Any]], Any]) -> dict[str, str]:
    """Site -> the site whose SVD it shares: layers that see the very same inputs on one batch (q, k
    and v projections) share one SVD, held by the first of them."""
    _run_with_hooks(model, bases, hooks, batch, _position_mask(batch, config), run)
    owner_of: dict[str, str] = {}
    by_print: dict[str, str] = {}
    for site, hook in hooks.items():
        if hook.rows is None:
            raise ConfigError(f"initialize_eva: layer {site} did not run on the first batch; EVA needs every "
                              f"adapted layer to run in the model's forward")
        owner_of[site] = by_print.setdefault(_fingerprint(hook.rows), site)
    return owner_of


def _fit_step(svd: IncrementalPCA, rows: torch.Tensor, converged: dict[str, torch.Tensor], site: str,
              tau: float) -> None:
    """One SVD step on a batch's rows; a component has converged when it moved less than ``tau``
    (cosine similarity with the previous step). Too few rows: no step (PEFT skips it too)."""
    if rows.shape[0] < svd.n_components:
        return
    previous = svd.components
    svd.partial_fit(rows)
    if previous is not None:
        assert svd.components is not None
        converged[site] = torch.nn.functional.cosine_similarity(svd.components, previous) >= tau


def _run_with_hooks(model: Any, bases: dict[str, Any], hooks: dict[str, _Inputs], batch: Mapping[str, Any],
                    mask: torch.Tensor | None, run: Callable[[Any, Mapping[str, Any]], Any]) -> None:
    handles = []
    for site, hook in hooks.items():
        hook.mask, hook.rows = mask, None
        handles.append(bases[site].register_forward_hook(hook, with_kwargs=True))
    try:
        run(model, batch)
    finally:
        for handle in handles:
            handle.remove()


def _distribute(svds: dict[str, IncrementalPCA], owner_of: dict[str, str], most: dict[str, int],
                budget: int) -> dict[str, int]:
    """The rank budget handed out by explained variance ratio over every layer's candidate components;
    of layers sharing an SVD, the one holding it gets the highest rank (its convergence covers theirs)."""
    keys, values = [], []
    # PEFT's order (layers holding an SVD, then the ones sharing it), which decides ties in the sort
    site_order = [s for s, o in owner_of.items() if s == o] + sorted(
        (s for s, o in owner_of.items() if s != o), key=lambda s: list(owner_of).index(owner_of[s]))
    for site in site_order:
        owner = owner_of[site]
        ratios = svds[owner].explained_variance_ratio
        assert ratios is not None
        for value in ratios[:most[site]]:
            keys.append(site)
            values.append(value)
    order = torch.stack(values).argsort(descending=True)
    counts = Counter(keys[i] for i in order[:budget].tolist())
    ranks = {site: counts.get(site, 0) for site in owner_of}
    for site in site_order:
        owner = owner_of[site]
        if site != owner and ranks[owner] < ranks[site]:
            ranks[owner], ranks[site] = ranks[site], ranks[owner]
    return ranks


def _apply(model: Any, record: Any, layers: dict[str, Any], components: dict[str, torch.Tensor]) -> dict[str, int]:
    """Put the EVA rows into each layer's A (B zero), resize layers whose rank moved (the same Parameter
    objects, so an optimizer made before keeps them), drop layers left at rank 0, and record the ranks
    and alphas in the config's patterns as PEFT does."""
    config = record.config
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    dropped = []
    for site, layer in layers.items():
        r = pattern_value(site, config.rank_pattern, config.r)
        alpha = pattern_value(site, config.alpha_pattern, config.alpha)
        rows = components[site]
        new_rank = rows.shape[0]
        if new_rank == 0:
            dropped.append(site)
            continue
        if new_rank != r and config.eva_adjust_scaling_factors:
            alpha *= new_rank / r
        layer.r = new_rank
        layer.scale = alpha / new_rank ** 0.5 if config.use_rslora else alpha / new_rank
        layer.lora_A.data = rows.to(device=layer.lora_A.device, dtype=layer.lora_A.dtype).contiguous()
        layer.lora_B.data = torch.zeros(layer.lora_B.shape[0], new_rank, dtype=layer.lora_B.dtype,
                                        device=layer.lora_B.device)
        layer.base_changed()  # DoRA's cached norms read the factors
        layer.eva_initialized = True
        if new_rank != config.r:
            rank_pattern[site] = new_rank
        if alpha != config.alpha:
            alpha_pattern[site] = alpha
    for site in dropped:
        model.base_model.get_submodule(site).remove_adapter(record.name)
    if dropped:
        kept = [s for s in record.sites if s.name not in dropped]
        config.target_modules = [s.name for s in kept]
        record.sites = kept
    config.rank_pattern, config.alpha_pattern = rank_pattern, alpha_pattern
    return {site: components[site].shape[0] for site in layers}


def eva_pending(model: Any, adapter_name: str) -> bool:
    """Whether adapter ``adapter_name`` asks for EVA and has not had it: init "eva", no layer
    initialised by EVA in this process, and every B still zero (not trained, not loaded trained)."""
    config = model.adapter_record(adapter_name).config
    if getattr(config, "init_weights", None) != "eva":
        return False
    layers = eva_layers(model, adapter_name)
    return bool(layers) and not any(getattr(layer, "eva_initialized", False) for layer in layers.values()) \
        and all(not layer.lora_B.any() for layer in layers.values())
