"""Composition values in training and at sites with one fused member, against separate runs and
hand formulas (not only shapes or "a gradient exists")."""

from __future__ import annotations

import torch

import peftkit
from peftkit import Fuse, Parallel
from peftkit.core.fusion import fusion_layers

from .composition_util import inputs, lora_model


def _loss_and_grads(model: peftkit.AdaptedModel, active, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    model.train_adapter(active)
    model.train()
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    grads = {f"{name}:{i}": p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
             for name in ("a", "b") for i, p in enumerate(model.adapter_parameters(name))}
    return loss.item(), grads


def test_a_parallel_training_loss_is_the_mean_of_the_separate_losses_and_so_are_its_gradients():
    model = lora_model(("a", "b"))
    batch = inputs(batch=2)
    loss_a, grads_a = _loss_and_grads(model, "a", batch)
    loss_b, grads_b = _loss_and_grads(model, "b", batch)
    assert abs(loss_a - loss_b) > 1e-3
    loss, grads = _loss_and_grads(model, Parallel("a", "b"), batch)
    # the batch runs once per child: the mean over its 2B rows is the mean of the two losses
    assert abs(loss - (loss_a + loss_b) / 2) < 1e-5
    for key, grad in grads.items():
        alone = grads_a[key] if key.startswith("a:") else grads_b[key]
        assert alone.abs().max() > 0
        torch.testing.assert_close(grad, alone / 2, atol=1e-6, rtol=1e-4, msg=lambda m, key=key: f"{key}: {m}")


def test_a_fusion_site_with_one_acting_member_adds_that_members_value_projected_change():
    model = lora_model(("a",), spec='lora[r=4,init_weights=false,target_modules=["q_proj"]]')
    torch.manual_seed(11)
    model.add_adapter("bn", "seq_bn[init_weights=false,reduction_factor=4]")  # only after the MLP
    model.add_fusion(Fuse("a", "bn", name="f"))
    torch.manual_seed(3)
    with torch.no_grad():
        for _, layer in fusion_layers(model, "f"):
            for p in layer.parameters():
                p.add_(torch.randn_like(p) * 0.3)
    site = "model.layers.1.self_attn.q_proj"  # LoRA "a" acts here, the bottleneck does not
    layer = model.base_model.get_submodule(site)
    assert "bn" not in layer.adapters and "f" in layer.fusions
    seen: dict[str, torch.Tensor] = {}
    layer.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    model.set_active(Fuse("a", "bn", name="f"))
    with torch.no_grad():
        model(**inputs())
        x = seen["x"]
        h = layer.base_layer(x)
        lora = layer.adapters["a"]
        z = (x @ lora.lora_A.T) @ lora.lora_B.T * lora.scale
        value = layer.fusions["f"].value.weight
    # one member: softmax over one key is 1, whatever the query and key say
    torch.testing.assert_close(seen["out"], h + z @ value.T, atol=1e-5, rtol=1e-5)


def test_a_fusion_layer_attends_as_the_paper_writes_it_with_explicit_keys():
    """FusionLayer scores with (W_k^T q) . z_n, never building the keys: the same as q . (W_k z_n) per member."""
    from peftkit.core.fuse_config import FuseConfig
    from peftkit.core.fusion import FusionLayer

    torch.manual_seed(5)
    for residual in (True, False):
        config = FuseConfig(temperature=0.7, query_key_dim=6, residual=residual)
        layer = FusionLayer(8, [0, 1, 2], config, "site")
        with torch.no_grad():
            for param in layer.parameters():
                param.copy_(torch.randn_like(param) * 0.5)
        h = torch.randn(2, 5, 8)
        contributions = [torch.randn(2, 5, 8) for _ in range(3)]
        out, probs = layer(h, contributions)
        query = h @ layer.query.weight.T + layer.query.bias
        scores = torch.stack([(query * (z @ layer.key.weight.T)).sum(-1) for z in contributions], dim=-1)
        expected_probs = torch.softmax(scores / 0.7, dim=-1)
        mixed = sum(expected_probs[..., i:i + 1] * z for i, z in enumerate(contributions))
        expected = h + mixed @ layer.value.weight.T if residual else (h + mixed) @ layer.value.weight.T
        torch.testing.assert_close(probs, expected_probs, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        assert probs.std() > 0.05  # the members are weighed differently: the scores are checked, not a uniform mix
        eye = torch.eye(8)
        torch.testing.assert_close(layer.value_distance(), (layer.value.weight - eye).pow(2).sum())
