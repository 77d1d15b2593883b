"""The per-worker step without Ray: accumulation, regularisation data, bf16, gradient checkpointing, EMA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raytuner.config import ConfigError, load_config
from raytuner.data.synthetic import synthetic_images, to_pixels
from raytuner.train.ema import AdapterEMA
from raytuner.train.model import build_model
from raytuner.train.step import MicroBatch, adapter_disabled, micro_batch_loss, optimizer_step
from tests.config.helpers import make_write_run
from tests.train.helpers import SCHEDULE, make_setup, micro, perturb


def test_two_accumulation_micro_steps_equal_one_step_on_the_whole_batch(tiny_cosmos_dir: Path) -> None:
    whole, split = make_setup(tiny_cosmos_dir), make_setup(tiny_cosmos_dir)
    for setup in (whole, split):
        perturb(setup)
    results = []
    for setup, batches in ((whole, [micro(whole, 0, 4)]), (split, [micro(split, 0, 2), micro(split, 2, 4)])):
        optimizer = torch.optim.SGD(setup.parameters, lr=0.1)
        results.append(
            optimizer_step(
                setup.family, setup.transformer, setup.network, setup.parameters, optimizer, batches, SCHEDULE
            )
        )
    assert results[0].loss == pytest.approx(results[1].loss, rel=1e-5)
    assert results[0].grad_norm == pytest.approx(results[1].grad_norm, rel=1e-4)
    for a, b in zip(whole.parameters, split.parameters, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_regularisation_data_is_trained_towards_the_base_models_own_prediction(tiny_cosmos_dir: Path) -> None:
    setup = make_setup(tiny_cosmos_dir)
    ordinary, regularisation = micro(setup, 0, 2), micro(setup, 0, 2, regularisation=True)
    with torch.no_grad():
        # A fresh adapter changes nothing, so the base model already matches its own prediction:
        # the regularisation loss is zero where the ordinary flow-matching loss is not.
        assert micro_batch_loss(setup.family, setup.transformer, setup.network, regularisation, SCHEDULE) == 0
        assert micro_batch_loss(setup.family, setup.transformer, setup.network, ordinary, SCHEDULE) > 0.1
    perturb(setup)
    with torch.no_grad():
        start = float(
            micro_batch_loss(setup.family, setup.transformer, setup.network, regularisation, SCHEDULE)
        )
    assert start > 0
    optimizer = torch.optim.AdamW(setup.parameters, lr=1e-2)
    results = [
        optimizer_step(
            setup.family,
            setup.transformer,
            setup.network,
            setup.parameters,
            optimizer,
            [regularisation],
            SCHEDULE,
        )
        for _ in range(15)
    ]
    # Every step reports its loss as the regularisation loss, and the adapter is pulled back
    # towards leaving the base model's prediction alone.
    assert all(r.regularisation_loss == pytest.approx(r.loss) for r in results)
    assert results[-1].loss < 0.5 * start, [r.loss for r in results]


def test_adapter_disabled_restores_the_multiplier(tiny_cosmos_dir: Path) -> None:
    setup = make_setup(tiny_cosmos_dir)
    setup.network.set_multiplier(0.75)
    with adapter_disabled(setup.network):
        assert all(lora.multiplier == 0 for lora in setup.network.loras)
    assert all(lora.multiplier == 0.75 for lora in setup.network.loras)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_cosmos_dir: Path) -> None:
    plain, checkpointed = make_setup(tiny_cosmos_dir), make_setup(tiny_cosmos_dir)
    checkpointed.transformer.enable_gradient_checkpointing()
    for setup in (plain, checkpointed):
        perturb(setup)
        setup.transformer.train()
        loss = micro_batch_loss(setup.family, setup.transformer, setup.network, micro(setup, 0, 2), SCHEDULE)
        loss.backward()
    for a, b in zip(plain.parameters, checkpointed.parameters, strict=True):
        assert a.grad is not None and b.grad is not None
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("family_name", ["cosmos2image", "omnigen"])
def test_gradient_checkpointing_interval_checkpoints_every_nth_block_with_the_same_gradients(
    family_name: str, tiny_cosmos_dir: Path, tiny_omnigen_dir: Path
) -> None:
    setup = make_setup(
        tiny_cosmos_dir if family_name == "cosmos2image" else tiny_omnigen_dir,
        family_name=family_name,
        num_layers=5,
    )
    perturb(setup)
    setup.transformer.train()
    results = {}
    # Five blocks: interval 2 checkpoints blocks 0, 2, 4; interval 3 blocks 0, 3; None all five.
    for interval, checkpointed in ((None, 5), (2, 3), (3, 2)):
        counter = setup.family.enable_gradient_checkpointing(setup.transformer, interval=interval)
        setup.network.zero_grad(set_to_none=True)
        loss = micro_batch_loss(setup.family, setup.transformer, setup.network, micro(setup, 0, 2), SCHEDULE)
        loss.backward()
        if counter is None:
            assert setup.transformer.is_gradient_checkpointing
        else:
            assert (counter.checkpointed, counter.kept) == (checkpointed, 5 - checkpointed)
        results[interval] = (loss.detach(), [p.grad for p in setup.parameters])
    full_loss, full_grads = results[None]
    assert sum(grad is not None for grad in full_grads) > len(full_grads) // 2
    for interval in (2, 3):
        loss, grads = results[interval]
        torch.testing.assert_close(loss, full_loss, rtol=0, atol=0)
        for a, b in zip(grads, full_grads, strict=True):
            assert (a is None) == (b is None)
            if a is not None and b is not None:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_interval_from_the_config_reaches_the_workers_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_cosmos_dir: Path
) -> None:
    write = make_write_run(tmp_path, monkeypatch)
    updates = {"pretrained_model_name_or_path": str(tiny_cosmos_dir), "mixed_precision": "no"}
    run = load_config(write(config_updates={**updates, "gradient_checkpointing_interval": 2}))
    model = build_model(run, device=torch.device("cpu"), base_device=torch.device("cpu"))
    assert model.checkpointing is not None and model.checkpointing.interval == 2
    family = model.family
    items = synthetic_images(2, width=64, height=64, seed=1)
    batch = MicroBatch(
        latents=family.encode_images(to_pixels([item.image for item in items])),
        conditioning=family.collate_conditioning(family.encode_prompts([item.caption for item in items])),
        generators=[torch.Generator().manual_seed(i) for i in range(2)],
    )
    micro_batch_loss(family, model.transformer, model.network, batch, SCHEDULE).backward()
    # The tiny transformer's two blocks: block 0 checkpointed, block 1 kept.
    assert (model.checkpointing.checkpointed, model.checkpointing.kept) == (1, 1)
    # 1 is every block (SimpleTuner reads it as unset); without gradient_checkpointing, a warning.
    every = load_config(write(config_updates={**updates, "gradient_checkpointing_interval": 1}))
    assert (
        build_model(every, device=torch.device("cpu"), base_device=torch.device("cpu")).checkpointing is None
    )
    off = load_config(
        write(config_updates={"gradient_checkpointing_interval": 3, "gradient_checkpointing": False})
    )
    assert any("'gradient_checkpointing_interval' = 3 has no effect" in w for w in off.warnings)
    with pytest.raises(ConfigError, match="'gradient_checkpointing_interval' = 0: expected"):
        load_config(write(config_updates={"gradient_checkpointing_interval": 0}))


def test_bf16_mixed_precision_trains_a_float32_adapter_on_a_bfloat16_base(tiny_cosmos_dir: Path) -> None:
    setup = make_setup(tiny_cosmos_dir, dtype=torch.bfloat16)
    assert next(setup.transformer.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in setup.parameters)
    optimizer = torch.optim.AdamW(setup.parameters, lr=1e-2)
    before = [p.detach().clone() for p in setup.parameters]
    result = optimizer_step(
        setup.family,
        setup.transformer,
        setup.network,
        setup.parameters,
        optimizer,
        [micro(setup, 0, 2)],
        SCHEDULE,
        mixed_precision="bf16",
    )
    assert torch.isfinite(torch.tensor(result.loss)) and result.grad_norm > 0
    assert all(p.dtype == torch.float32 for p in setup.parameters)
    assert any(not torch.equal(a, b) for a, b in zip(before, setup.parameters, strict=True))


def test_ema_follows_the_weights_at_its_decay_and_swaps_in_and_out() -> None:
    parameter = torch.nn.Parameter(torch.zeros(3))
    ema = AdapterEMA([parameter], decay=0.9)
    with torch.no_grad():
        parameter.fill_(1.0)
    ema.update()
    torch.testing.assert_close(ema.averages[0], torch.full((3,), 0.1))
    with ema.swapped_in():
        torch.testing.assert_close(parameter.detach(), torch.full((3,), 0.1))
    torch.testing.assert_close(parameter.detach(), torch.ones(3))
    restored = AdapterEMA([parameter], decay=0.9)
    restored.load_state_dict(ema.state_dict())
    torch.testing.assert_close(restored.averages[0], ema.averages[0])
