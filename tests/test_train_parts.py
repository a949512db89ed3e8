"""Unit checks of the trainer's pieces: LR schedules, the balancing update, the sequence-wise loss, sampling."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_config
from nanoseek.models.common.moe import MoE
from nanoseek.presets import preset
from nanoseek.train.balance import ImbalanceTracker, update_expert_bias
from nanoseek.train.config import TrainConfig
from nanoseek.train.optim import lr_factor


def test_schedules():
    cosine = TrainConfig(max_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cosine) == pytest.approx(0.1) and lr_factor(9, cosine) == pytest.approx(1.0)
    assert lr_factor(60, cosine) == pytest.approx(0.55) and lr_factor(110, cosine) == pytest.approx(0.1)
    wsd = TrainConfig(max_steps=110, warmup_steps=10, min_lr_ratio=0.1, schedule="wsd", decay_fraction=0.2)
    assert lr_factor(80, wsd) == 1.0 and lr_factor(100, wsd) == pytest.approx(0.55)
    assert lr_factor(110, wsd) == pytest.approx(0.1)


def test_bias_moves_against_load_error():
    moe = MoE(tiny_config())
    load = torch.tensor([10.0, 0, 2, 2, 2, 2, 2, 4])  # mean 3
    update_expert_bias([moe], [load], speed=0.01)
    assert moe.router.expert_bias.tolist() == pytest.approx([-0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, -0.01])
    tracker = ImbalanceTracker(1)
    tracker.add([load])
    assert tracker.window() == pytest.approx(10 / 3)


def test_sequence_balance_loss_is_one_when_even():
    """Perfectly even routing and affinities give f_i = 1 and P_i = 1/E, so Σ f_i·P_i = 1 (before its α); a
    forward adds α times it to its ForwardTerms."""
    from nanoseek.models.common.terms import ForwardTerms

    moe = MoE(tiny_config())
    scores = torch.full((2, 8, 8), 0.3)
    expert_ids = torch.arange(8).repeat(2, 2)  # each expert picked twice per sequence of 8 tokens × top-2
    assert moe.sequence_balance_loss(scores, expert_ids).item() == pytest.approx(1.0)
    skewed = torch.zeros(2, 16, dtype=torch.long)  # everything to expert 0, which also has all the affinity
    skewed_scores = torch.zeros(2, 8, 8).index_fill_(2, torch.tensor([0]), 1.0)
    assert moe.sequence_balance_loss(skewed_scores, skewed).item() == pytest.approx(8.0)
    x = torch.randn(2, 8, tiny_config().hidden_size, generator=torch.Generator().manual_seed(0))
    half, whole = ForwardTerms(balance_alpha=0.5), ForwardTerms(balance_alpha=1.0)
    moe(x, terms=half), moe(x, terms=whole)
    assert half.balance_loss.item() == pytest.approx(0.5 * whole.balance_loss.item()) and whole.balance_loss > 0


def test_overrides_take_the_field_type():
    from nanoseek.train.config import apply_overrides

    model, train = apply_overrides(
        preset("tiny"),
        TrainConfig(),
        {
            "train.balance": "none",
            "model.q_lora_rank": "null",
            "train.lr": "1e-3",
            "use_mtp": "false",
            "model.hidden_size": "256",
        },
    )
    assert train.balance == "none" and train.lr == 1e-3 and train.use_mtp is False
    assert model.q_lora_rank is None and model.hidden_size == 256


def test_stop_requests_first_signal_asks_second_aborts():
    """SIGTERM or a first Ctrl-C only ask (the step finishes and a checkpoint is written); a second one aborts at
    once; leaving restores the previous handlers."""
    import os
    import signal

    from nanoseek.train.interrupt import StopRequests

    before = signal.getsignal(signal.SIGINT)
    with StopRequests(announce=False) as stop:
        assert not stop.agreed()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.agreed()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_a_checkpoint_saved_again_is_replaced_never_lost(tmp_path, monkeypatch):
    """A resumed run saving a step that already has a checkpoint: if the final rename fails, the old one is still
    there and loads; once it succeeds, the new one is in place and nothing is left aside."""
    import nanoseek
    from nanoseek.errors import CheckpointError
    from nanoseek.train import checkpoint as train_checkpoint

    torch.manual_seed(0)
    model = nanoseek.build_model(tiny_config()).eval()
    optimizer = torch.optim.AdamW(model.parameters())
    first = {k: v.clone() for k, v in model.state_dict().items()}
    directory = tmp_path / "checkpoints"
    path = train_checkpoint.save_checkpoint(directory, 5, model, optimizer, {}, keep=3)
    with torch.no_grad():
        model.embed.weight.add_(1.0)
    real_replace = train_checkpoint.os.replace

    def failing_replace(source, target):
        if str(source).endswith(".tmp-step_0000005"):
            raise OSError(28, "No space left on device")
        return real_replace(source, target)

    monkeypatch.setattr(train_checkpoint.os, "replace", failing_replace)
    with pytest.raises(CheckpointError, match="No space left on device"):
        train_checkpoint.save_checkpoint(directory, 5, model, optimizer, {}, keep=3)
    monkeypatch.setattr(train_checkpoint.os, "replace", real_replace)
    assert train_checkpoint.list_checkpoints(directory) == [path]
    restored = nanoseek.build_model(tiny_config())
    train_checkpoint.load_checkpoint(path, restored, torch.optim.AdamW(restored.parameters()))
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in first.items())
    train_checkpoint.save_checkpoint(directory, 5, model, optimizer, {}, keep=3)
    train_checkpoint.load_checkpoint(path, restored, torch.optim.AdamW(restored.parameters()))
    assert torch.equal(restored.embed.weight, model.embed.weight)
    assert sorted(p.name for p in directory.iterdir()) == ["step_0000005"]
