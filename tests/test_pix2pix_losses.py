"""Pix2PixTrainer's one iteration against pix2pix's losses and steps computed here, on real BraTS slices.

With tiny networks (1×1 convolutions) and plain SGD, one iteration's parameter updates are ``-lr · grad`` of the two
objectives written out below from pix2pix (Isola et al., CVPR 2017) as the trainer documents them:

- discriminator first: ``d = ½·[BCE(D([x, y]), 1) + BCE(D([x, G(x)]), 0)]`` (D conditional on the inputs, the
  inputs first along channels; G(x) a constant for this step);
- then the generator through the stepped discriminator D': ``g = BCE(D'([x, G(x)]), 1) + 100·L1(G(x), y)``,

BCE being binary cross-entropy with logits averaged over the patch logits. A generator step that does not reach
G through D (a detached fake), real pairs labelled fake, or the generator stepped through the old D all give other
updates.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from agi_monai.engines import Pix2PixTrainer
from helpers import DATA

GLI = DATA / "brats2023-gli" / "BraTS-GLI-00001-000" / "BraTS-GLI-00001-000-"
LR, L1_WEIGHT = 0.1, 100.0
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    """Three real axial slices (central 48×48) of BraTS-GLI-00001-000: inputs (T1, T2), target FLAIR, each scaled
    to [0, 1]."""
    def planes(contrast: str) -> np.ndarray:
        volume = np.asarray(nib.load(f"{GLI}{contrast}.nii.gz").dataobj[96:144, 96:144, 65:90:12], dtype=np.float32)
        return np.moveaxis(volume / volume.max(), -1, 0)[:, None]  # (3, 1, 48, 48)

    image = torch.from_numpy(np.concatenate([planes("t1n"), planes("t2w")], axis=1))
    target = torch.from_numpy(planes("t2f"))
    assert image.shape == (3, 2, 48, 48) and target.shape == (3, 1, 48, 48)
    return {"image": image, "target": target}


def _networks() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    generator = nn.Conv2d(2, 1, 1)
    discriminator = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LeakyReLU(0.2), nn.Conv2d(4, 1, 1))
    return generator, discriminator


def _bce(logits: torch.Tensor, real: bool) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, 1.0 if real else 0.0))


def _functional_d(params: dict[str, torch.Tensor], pair: torch.Tensor) -> torch.Tensor:
    h = F.leaky_relu(F.conv2d(pair, params["0.weight"], params["0.bias"]), 0.2)
    return F.conv2d(h, params["2.weight"], params["2.bias"])


def _clone(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone().requires_grad_(True) for name, value in module.named_parameters()}


def test_one_iteration_steps_d_then_g_by_the_pix2pix_gradients(batch):
    generator, discriminator = _networks()
    g0, d0 = _clone(generator), _clone(discriminator)
    x, y = batch["image"], batch["target"]

    # discriminator step, the fake a constant
    fake = F.conv2d(x, g0["weight"], g0["bias"])
    d_loss = 0.5 * (_bce(_functional_d(d0, torch.cat([x, y], 1)), True)
                    + _bce(_functional_d(d0, torch.cat([x, fake.detach()], 1)), False))
    d_grads = dict(zip(d0, torch.autograd.grad(d_loss, list(d0.values()))))
    d1 = {name: (d0[name] - LR * d_grads[name]).detach() for name in d0}

    # generator step through the stepped discriminator
    adv_loss = _bce(_functional_d(d1, torch.cat([x, fake], 1)), True)
    l1_loss = (fake - y).abs().mean()
    g_loss = adv_loss + L1_WEIGHT * l1_loss
    g_grads = dict(zip(g0, torch.autograd.grad(g_loss, list(g0.values()), retain_graph=True)))
    g1 = {name: (g0[name] - LR * g_grads[name]).detach() for name in g0}

    # The test can tell the alternatives apart: the adversarial term's own gradient on G (what a detached fake
    # drops), and G's gradient through the old discriminator (the wrong order), differ from g's by far more than
    # the tolerance.
    adv_grads = torch.autograd.grad(adv_loss, list(g0.values()), retain_graph=True)
    assert min(grad.abs().max().item() for grad in adv_grads) > 1e-3
    g_old_d = _bce(_functional_d(d0, torch.cat([x, fake], 1)), True) + L1_WEIGHT * l1_loss
    old_d_grads = torch.autograd.grad(g_old_d, list(g0.values()))
    assert max((a - b).abs().max().item() for a, b in zip(old_d_grads, g_grads.values())) > 1e-4

    trainer = Pix2PixTrainer(
        device="cpu", max_epochs=1, train_data_loader=[batch], generator=generator, discriminator=discriminator,
        g_optimizer=torch.optim.SGD(generator.parameters(), lr=LR),
        d_optimizer=torch.optim.SGD(discriminator.parameters(), lr=LR), l1_weight=L1_WEIGHT,
    )
    trainer.run()
    assert trainer.state.iteration == 1

    for name, value in discriminator.named_parameters():
        torch.testing.assert_close(value.detach(), d1[name], **TOLERANCE, msg=f"discriminator {name}")
    for name, value in generator.named_parameters():
        torch.testing.assert_close(value.detach(), g1[name], **TOLERANCE, msg=f"generator {name}")
    output = trainer.state.output
    for key, expected in (("d_loss", d_loss), ("adv_loss", adv_loss), ("l1_loss", l1_loss), ("g_loss", g_loss),
                          ("loss", g_loss)):
        assert output[key] == pytest.approx(expected.item(), rel=1e-5), key
    torch.testing.assert_close(output["pred"], fake.detach())  # the generator's output before its step


def test_real_pairs_are_labelled_real_and_fake_pairs_fake_in_d_loss(batch):
    # A discriminator that is right: logits 2a·(contrast channel) + a, so ≥ a on the real pairs (target in [0, 1])
    # and -a on the fake ones (the generator gives -1 everywhere). pix2pix's labels give it a small loss,
    # ½·[mean softplus(-real logits) + softplus(-a)] < 0.05; real and fake labels swapped would give more than 3.
    generator = nn.Conv2d(2, 1, 1)
    with torch.no_grad():
        generator.weight.zero_()
        generator.bias.fill_(-1.0)  # fake = -1 everywhere, the real target in [0, 1]
    discriminator = nn.Conv2d(3, 1, 1)
    a = 3.0
    with torch.no_grad():
        discriminator.weight.zero_()
        discriminator.weight[0, 2] = 2 * a  # channel 2: the target or the fake, after the two inputs
        discriminator.bias.fill_(a)
    trainer = Pix2PixTrainer(
        device="cpu", max_epochs=1, train_data_loader=[batch], generator=generator, discriminator=discriminator,
        g_optimizer=torch.optim.SGD(generator.parameters(), lr=0.0),
        d_optimizer=torch.optim.SGD(discriminator.parameters(), lr=0.0),
    )
    trainer.run()
    real_logits = 2 * a * batch["target"] + a
    expected = 0.5 * (F.softplus(-real_logits).mean() + F.softplus(torch.tensor(-a)))
    assert trainer.state.output["d_loss"] == pytest.approx(expected.item(), rel=1e-6)
    assert expected.item() < 0.05
