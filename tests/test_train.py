"""Training recipe on tiny models: the four modes, a plain HF student, resume, curriculum, metrics, optimizers."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from conftest import TEXT, make_tiny_model, make_tiny_tokenizer, write_teacher_and_looped_student
from transformers import AutoModelForCausalLM

from loopfit.errors import LoopfitError
from loopfit.train import DistillationConfig, LoRAConfig, OptimConfig, ParamGroupRule, StageConfig, TrainConfig
from loopfit.train.recipe import depth_at, fit, setup, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = write_teacher_and_looped_student(tmp_path_factory.mktemp("train"))
    # Exactly one batch of 4 rows of 32 tokens: every step sees the same batch.
    (root / "one_batch.txt").write_text("\n\n".join(TEXT.split("\n\n")[:3]))
    return root


def _cfg(models, tmp_path, **kw) -> TrainConfig:
    base = dict(
        model_name=str(models / "looped"),
        out=str(tmp_path / "run"),
        data=str(models / "data.txt"),
        seq_len=32,
        batch_size=4,
        max_steps=4,
        progress_bar=False,
        tensorboard=False,
        fixed_num_steps=2,
    )
    base.update(kw)
    return TrainConfig(**base)


def _metrics(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("kd", [False, True])
def test_four_modes_train(models, tmp_path, lora, kd):
    """Loss falls over 30 steps on a fixed batch; every trainable parameter changed and no frozen one did."""
    cfg = _cfg(
        models,
        tmp_path,
        data=str(models / "one_batch.txt"),
        max_steps=30,
        lora=LoRAConfig(enabled=lora, r=4, modules_to_save=["adapter"] if lora else None),
        distillation=DistillationConfig(
            enabled=kd, teacher_model_name=str(models / "teacher") if kd else None, ce_scale=0.0, kd_scale=1.0
        ),
    )
    cfg.optim_config.lr = 1e-2 if lora else 3e-3
    run = setup(cfg)
    assert run.stream.per_epoch == 1
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    trainable = {n for n, _ in run.trainable}
    fit(run)
    run.logger.close()
    m = _metrics(tmp_path / "run")
    assert len(m) == 30
    assert m[-1]["loss"] < 0.7 * m[0]["loss"], (m[0]["loss"], m[-1]["loss"])
    if kd:  # ce_scale = 0, kd_scale = 1: the loss is the KD term alone
        assert m[0]["kd_loss"] > 0 and math.isclose(m[0]["loss"], m[0]["kd_loss"], rel_tol=1e-6)
    else:
        assert m[0]["kd_loss"] is None and math.isclose(m[0]["loss"], m[0]["ce_loss"], rel_tol=1e-6)
    for n, p in run.model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == (n in trainable), n
    if lora:
        assert all("lora_" in n or "modules_to_save" in n for n in trainable)
        assert any("adapter.modules_to_save" in n for n in trainable)


def test_plain_student_distillation(models, tmp_path):
    """A non-looped HF student: ordinary teacher -> student KD through the same command."""
    student = make_tiny_model("llama", num_layers=2, hidden=32, seed=1)
    student.save_pretrained(tmp_path / "plain")
    make_tiny_tokenizer().save_pretrained(tmp_path / "plain")
    cfg = _cfg(
        models,
        tmp_path,
        model_name=str(tmp_path / "plain"),
        fixed_num_steps=None,
        max_steps=3,
        lora=LoRAConfig(enabled=True, r=4),
        val_fraction=0.1,
        distillation=DistillationConfig(enabled=True, teacher_model_name=str(models / "teacher")),
    )
    val = train(cfg)
    assert set(val) == {None} and val[None] > 0
    m = _metrics(tmp_path / "run")
    assert [x["step"] for x in m[:3]] == [1, 2, 3] and m[0]["kd_loss"] > 0
    assert math.isclose(m[0]["loss"], 0.5 * m[0]["ce_loss"] + 0.5 * m[0]["kd_loss"], rel_tol=1e-5)
    with pytest.raises(LoopfitError, match="not a looped model"):
        setup(_cfg(models, tmp_path / "b", model_name=str(tmp_path / "plain")))


def test_resume_matches_uninterrupted_run(models, tmp_path):
    """8 steps straight == 4 steps, interruption, resume, 4 steps: identical losses (fp32, CPU)."""
    kw = dict(
        max_steps=8,
        save_every=4,
        fixed_num_steps=None,
        lora=LoRAConfig(enabled=True, r=4),
        distillation=DistillationConfig(enabled=True, teacher_model_name=str(models / "teacher")),
    )
    kw["mean_recurrence_schedule"] = dict(turn_on=True, warmup=0.5, max_mean_rec=3)
    from loopfit.train.config import MeanRecurrenceSchedule

    kw["mean_recurrence_schedule"] = MeanRecurrenceSchedule(**kw["mean_recurrence_schedule"])
    straight = _cfg(models, tmp_path / "a", **kw)
    train(straight)
    interrupted = _cfg(models, tmp_path / "b", **kw)
    run = setup(interrupted)
    fit(run, until=6)  # checkpoint at 4, two more steps logged, then "killed"
    run.logger.close()
    assert len(_metrics(tmp_path / "b" / "run")) == 6
    resumed = _cfg(models, tmp_path / "b", resume=True, **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(resumed)
    # Positioning the lr schedule on resume is by design, not torch's "scheduler before optimizer" mistake.
    assert not [w for w in caught if "lr_scheduler.step" in str(w.message)]
    a, b = _metrics(tmp_path / "a" / "run"), _metrics(tmp_path / "b" / "run")
    keys = ("step", "loss", "ce_loss", "kd_loss", "num_steps", "mean_recurrence", "grad_norm", "lr")
    assert [[x[k] for k in keys] for x in a] == [[x[k] for k in keys] for x in b]
    # Resuming a finished run changes nothing and succeeds.
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "b" / "run").rglob("*") if p.is_file()}
    assert train(resumed) is None
    assert files == {p: p.stat().st_mtime_ns for p in (tmp_path / "b" / "run").rglob("*") if p.is_file()}


def test_metrics_keys_and_curriculum(models, tmp_path):
    from loopfit.train.config import MeanRecurrenceSchedule
    from loopfit.train.schedules import ramp

    cfg = _cfg(
        models,
        tmp_path,
        fixed_num_steps=None,
        max_steps=8,
        mean_recurrence_schedule=MeanRecurrenceSchedule(turn_on=True, warmup=0.5, max_mean_rec=4),
        eval_every=4,
        val_data=str(models / "data.txt"),
        eval_batches=2,
        eval_num_steps=[1, 8],
    )
    val = train(cfg)
    m = _metrics(tmp_path / "run")
    assert [x["step"] for x in m if "val_loss" in x] == [4, 8]
    assert set(val) == {1, 4, 8} and m[-1]["val_loss_r4"] == val[4] and m[-1]["step"] == 8
    assert json.loads((tmp_path / "run" / "done.json").read_text())["val_loss"]["8"] == val[8]
    required = {
        "step",
        "loss",
        "ce_loss",
        "kd_loss",
        "lr",
        "mean_recurrence",
        "num_steps",
        "tokens_per_s",
        "grad_norm",
        "mfu",
        "num_steps_no_grad",
        "num_steps_grad",
    }
    assert required <= set(m[0])
    assert [x["mean_recurrence"] for x in m[:8]] == [ramp(s, 8, 0.5, "linear", 4) for s in range(8)]
    assert [x["mean_recurrence"] for x in m[:8]] == [1, 2, 3, 4, 4, 4, 4, 4]
    assert all(x["num_steps"] == x["num_steps_no_grad"] + x["num_steps_grad"] >= 1 for x in m[:8])
    assert all(0 < x["mfu"] < 1 and x["tokens_per_s"] > 0 for x in m[:8])


def test_ramp_shapes_and_sampler_mean():
    from loopfit.models import sample_num_steps
    from loopfit.train.schedules import ramp

    assert [ramp(s, 100, 0.5, "linear", 8) for s in (0, 25, 50, 99)] == [1, math.ceil(1 + 7 * 0.5), 8, 8]
    assert ramp(25, 100, 0.5, "1-sqrt", 8) == math.ceil(1 + 7 * (1 - math.sqrt(0.5)))
    # 1 - sqrt(1 - t) lies below t: it deepens slowly at first and fastest at the end of the warmup.
    assert ramp(10, 100, 0.5, "1-sqrt", 8) < ramp(10, 100, 0.5, "linear", 8)
    g = torch.Generator().manual_seed(0)
    draws = [sample_num_steps(6, 4, g) for _ in range(20000)]
    r = torch.tensor([n + k for n, k in draws], dtype=torch.float64)
    # R = Poisson(rate) + 1 with E[rate] = mean: the draws average mean + 1 (std ~4, so 4 standard errors ~0.12).
    assert abs(r.mean().item() - 7.0) < 0.12
    assert all(k == min(4, n + k) for n, k in draws)


def test_depth_draws_are_seeded(models, tmp_path):
    from loopfit.train.config import MeanRecurrenceSchedule

    cfg = _cfg(models, tmp_path, fixed_num_steps=None, mean_recurrence_schedule=MeanRecurrenceSchedule(turn_on=True))
    run = setup(cfg)
    a = [depth_at(run, s)[2] for s in range(20)]
    run.depth_gen.manual_seed(cfg.seed + 7919)
    assert a == [depth_at(run, s)[2] for s in range(20)]
    run.logger.close()


def test_min_num_steps_floors_the_draws(models, tmp_path):
    cfg = _cfg(models, tmp_path, fixed_num_steps=None, mean_recurrence=3, backprop_depth=3)
    run = setup(cfg)
    free = [depth_at(run, s)[2] for s in range(300)]
    run.logger.close()
    floored_cfg = _cfg(models, tmp_path / "f", fixed_num_steps=None, mean_recurrence=3, backprop_depth=3,
                       min_num_steps=3)  # fmt: skip
    run = setup(floored_cfg)
    floored = [depth_at(run, s)[2] for s in range(300)]
    run.logger.close()
    assert min(n + k for n, k in free) < 3  # the plain sampler does draw shallow depths
    # Same draws, raised where below the floor; the gradient iterations stay the sampler's k = 3.
    assert all(f == ((n, k) if n + k >= 3 else (0, 3)) for (n, k), f in zip(free, floored))
    with pytest.raises(LoopfitError, match="min_num_steps"):
        setup(_cfg(models, tmp_path / "bad", min_num_steps=3))


def test_backprop_depth_above_the_mean_is_reported(models, tmp_path, capsys):
    """k is capped at the mean (the reference's rule); a larger --backprop_depth is said at start, not ignored."""
    run = setup(_cfg(models, tmp_path, fixed_num_steps=None, mean_recurrence=2, backprop_depth=6))
    run.logger.close()
    assert "--backprop_depth 6 exceeds the mean depth 2" in capsys.readouterr().err
    assert all(k <= 2 for _, k in (depth_at(run, s)[2] for s in range(50)))


def test_lr_schedules():
    from loopfit.train.config import LRSchedule
    from loopfit.train.schedules import lr_factor

    wsd = LRSchedule(kind="wsd", warmup_steps=2, decay_fraction=0.5, min_lr_ratio=0.1)
    f = [lr_factor(s, 10, wsd) for s in range(10)]
    assert f[:2] == [0.5, 1.0] and f[2:5] == [1.0] * 3
    assert f[5] > f[6] > f[9] and math.isclose(f[9], 0.1)
    cos = LRSchedule(kind="cosine", warmup_steps=0, min_lr_ratio=0.0)
    assert math.isclose(lr_factor(0, 10, cos), 1.0) and math.isclose(lr_factor(5, 10, cos), 0.5)


def test_param_groups_optimizers_and_stages(models, tmp_path):
    from loopfit.train.config import OptimConfig
    from loopfit.train.optim import build_optimizers, lr_multiplier

    rules = [ParamGroupRule("block", 0.0), ParamGroupRule("adapter", 10.0), ParamGroupRule("block|coda", 2.0)]
    assert lr_multiplier("model.block.0.mlp", rules) == 0.0  # first match wins
    assert lr_multiplier("model.coda.0.mlp", rules) == 2.0 and lr_multiplier("lm_head", rules) == 1.0
    lin = torch.nn.Linear(4, 4)
    named = [("a.weight", lin.weight), ("a.bias", lin.bias), ("x.norm.weight", torch.nn.Parameter(torch.ones(4)))]
    (opt,) = build_optimizers(named, OptimConfig(weight_decay=0.1), [])
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay == {id(lin.weight): 0.1, id(lin.bias): 0.0, id(named[2][1]): 0.0}
    muon, adam = build_optimizers(named, OptimConfig(optimizer="muon"), [])
    assert isinstance(muon, torch.optim.Muon) and [p for g in muon.param_groups for p in g["params"]] == [lin.weight]
    (ellis,) = build_optimizers(named, OptimConfig(optimizer="ellis_adam", lr=0.1), [])
    lin.weight.grad = torch.full_like(lin.weight, 1e-6)  # tiny gradient: normalisation makes the step lr-sized
    w0 = lin.weight.detach().clone()
    ellis.step()
    assert torch.allclose(w0 - lin.weight.detach(), torch.full_like(w0, 0.1 * math.atan(1.0)), atol=1e-5)

    # Two stages: the block frozen first, then unfrozen (optimizer rebuilt).
    cfg = _cfg(
        models, tmp_path, max_steps=4, stages=[StageConfig(2, [ParamGroupRule(r"\.block\.", 0.0)]), StageConfig(2, [])]
    )
    run = setup(cfg)
    block = [p for n, p in run.trainable if ".block." in n]
    b0 = [p.detach().clone() for p in block]
    fit(run, until=2)
    assert all(torch.equal(a, p) for a, p in zip(b0, block)) and run.stage == 0
    fit(run)
    assert run.stage == 1 and not all(torch.equal(a, p) for a, p in zip(b0, block))
    run.logger.close()


def test_grad_accumulation_equals_larger_batch(models, tmp_path):
    common = dict(
        max_steps=2,
        lora=LoRAConfig(enabled=True, r=4),
        distillation=DistillationConfig(enabled=True, teacher_model_name=str(models / "teacher")),
    )
    big = setup(_cfg(models, tmp_path / "a", batch_size=4, **common))
    fit(big)
    small = setup(_cfg(models, tmp_path / "b", batch_size=2, gradient_accumulation_steps=2, **common))
    fit(small)
    for (n, p), (_, q) in zip(big.trainable, small.trainable):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=n)
    ma, mb = _metrics(tmp_path / "a" / "run"), _metrics(tmp_path / "b" / "run")
    assert [x["loss"] for x in ma] == pytest.approx([x["loss"] for x in mb], rel=1e-5)
    big.logger.close()
    small.logger.close()


def test_gradient_checkpointing_gives_the_same_training(models, tmp_path):
    common = dict(
        max_steps=2,
        lora=LoRAConfig(enabled=True, r=4),
        distillation=DistillationConfig(enabled=True, teacher_model_name=str(models / "teacher")),
    )
    plain = setup(_cfg(models, tmp_path / "a", **common))
    fit(plain)
    ckpt = setup(_cfg(models, tmp_path / "b", gradient_checkpointing=True, **common))
    assert any(getattr(m, "gradient_checkpointing", False) for m in ckpt.model.modules())
    fit(ckpt)
    for (n, p), (_, q) in zip(plain.trainable, ckpt.trainable):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=n)
    plain.logger.close()
    ckpt.logger.close()


def test_activation_checkpointing_uses_the_name_the_installed_transformers_has():
    from loopfit.models.layers import enable_activation_checkpointing

    class Old:  # transformers < 5.24: only the old name
        def gradient_checkpointing_enable(self, **kw):
            self.called = ("old", kw)

    class New(Old):  # 5.24 and later: the old name still there, deprecated
        def activation_checkpointing_enable(self, **kw):
            self.called = ("new", kw)

    old, new = Old(), New()
    enable_activation_checkpointing(old)
    enable_activation_checkpointing(new)
    assert old.called == ("old", {"gradient_checkpointing_kwargs": {"use_reentrant": False}})
    assert new.called == ("new", {"activation_checkpointing_kwargs": {"use_reentrant": False}})


def test_teacher_weights_shared_not_copied(models, tmp_path):
    cfg = _cfg(
        models,
        tmp_path,
        lora=LoRAConfig(enabled=True, r=4),
        distillation=DistillationConfig(enabled=True, teacher_model_name=str(models / "teacher")),
    )
    run = setup(cfg)
    assert run.info["shared_bytes"] > 0
    t = run.teacher.model
    base = run.model.get_base_model().model
    assert base.block[0].mlp.up_proj.base_layer.weight is t.layers[3].mlp.up_proj.weight
    assert base.prelude[0].self_attn.q_proj.base_layer.weight is t.layers[0].self_attn.q_proj.weight
    assert base.embed_tokens.weight is t.embed_tokens.weight
    run.logger.close()


def test_pruned_student_shares_its_renumbered_layers_with_the_teacher():
    """A pruned student's layer j is the source's layer kept[j]: found by content, shared; a changed weight is not."""
    from loopfit.convert import Layout, to_static
    from loopfit.train.student import share_teacher_weights

    teacher = make_tiny_model("llama", num_layers=6, hidden=32)
    student = to_static(teacher, Layout([0], [3, 4], [5])).requires_grad_(False)
    with torch.no_grad():
        student.model.layers[2].mlp.down_proj.weight.add_(1.0)  # no longer the source's layer 4
    params = dict(student.named_parameters())  # embeddings tied to the head: counted once
    want = sum(p.numel() * 4 for n, p in params.items() if "layers.2.mlp.down_proj" not in n)
    assert share_teacher_weights(student, teacher) == want
    assert student.model.layers[1].mlp.up_proj.weight is teacher.model.layers[3].mlp.up_proj.weight
    assert student.model.layers[3].self_attn.q_proj.weight is teacher.model.layers[5].self_attn.q_proj.weight
    assert student.model.layers[2].mlp.down_proj.weight is not teacher.model.layers[4].mlp.down_proj.weight


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(distillation=DistillationConfig(enabled=True)), "teacher_model_name"),
        (dict(lora=LoRAConfig(enabled=False, modules_to_save=["adapter"])), "modules_to_save"),
        (dict(optim_config={"optimizer": "sgd"}), "optimizer"),
        (dict(fixed_num_steps=2, mean_recurrence_schedule={"turn_on": True}), "fixed_num_steps"),
        (dict(eval_every=5), "validation"),
        (dict(lr_schedule={"warmup_steps": 10}), "warmup_steps"),
        (dict(param_groups=[ParamGroupRule("(", 1.0)]), "pattern"),
    ],
)
def test_nonsense_refused_at_start(models, tmp_path, kw, match):
    from loopfit.train import config as C

    for key, cls in (
        ("optim_config", C.OptimConfig),
        ("mean_recurrence_schedule", C.MeanRecurrenceSchedule),
        ("lr_schedule", C.LRSchedule),
    ):
        if isinstance(kw.get(key), dict):
            kw[key] = cls(**kw[key])
    if "fixed_num_steps" not in kw:
        kw["fixed_num_steps"] = None
    with pytest.raises(LoopfitError, match=match):
        _cfg(models, tmp_path, **kw).validate()


def test_cli_config_file_and_export(models, tmp_path):
    """`loopfit train --config X.yaml` (a dump of the typed config) and `loopfit export` to a loadable HF folder."""
    import yaml
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loopfit.cli import main
    from loopfit.loading import load_model

    out = tmp_path / "run"
    cfg = {
        "model_name": str(models / "looped"),
        "out": str(out),
        "data": str(models / "data.txt"),
        "seq_len": 32,
        "batch_size": 4,
        "max_steps": 2,
        "fixed_num_steps": 2,
        "progress_bar": False,
        "tensorboard": False,
        "lora": {"enabled": True, "r": 4, "modules_to_save": ["adapter"]},
        "optim_config": {"lr": 1e-2},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    main(["train", "--config", str(tmp_path / "c.yaml")])
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["lora"]["r"] == 4 and saved["max_steps"] == 2 and saved["resume"] is False
    with pytest.raises(SystemExit) as e:  # an existing run folder without --resume/--overwrite is refused
        main(["train", "--config", str(out / "config.yaml")])
    assert e.value.code == 2
    main(["train", "--config", str(out / "config.yaml"), "--resume=true"])  # finished: exits quietly

    main(["export", str(out), "--out", str(tmp_path / "merged")])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    peft = PeftModel.from_pretrained(load_model(models / "looped"), str(out / "final")).eval()
    ids = torch.randint(4, 250, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids, num_steps=2).logits, peft(ids, num_steps=2).logits, atol=1e-4, rtol=0)
        plain = load_model(models / "looped")(ids, num_steps=2).logits
    assert not torch.allclose(merged(ids, num_steps=2).logits, plain, atol=1e-4)


def test_offline_teacher_cache_matches_live_teacher(models, tmp_path):
    """A cache holding the teacher's whole distribution (top-k = vocabulary) gives the live teacher's KD loss."""
    from loopfit.cache.writer import CacheSettings, write_cache
    from loopfit.data import build_dataset, tokenizer_hash
    from loopfit.loading import load_model, load_tokenizer

    tok = load_tokenizer(models / "teacher")
    packed = build_dataset(str(models / "data.txt"), tok, 32, seed=0)
    teacher = load_model(models / "teacher").eval()
    vocab = teacher.get_output_embeddings().weight.shape[0]
    info = {"teacher": "t", "tokenizer_hash": tokenizer_hash(tok), "data_hash": packed.data_hash, "vocab_size": vocab}
    write_cache(teacher, packed.train, tmp_path / "cache", CacheSettings(estimator="topk", top_k=vocab), info,
                progress=False)  # fmt: skip
    common = dict(max_steps=2, lora=LoRAConfig(enabled=True, r=4))
    live = _cfg(models, tmp_path / "a", **common, distillation=DistillationConfig(
        enabled=True, teacher_model_name=str(models / "teacher"), temperature=1.0))  # fmt: skip
    cached = _cfg(models, tmp_path / "b", **common, distillation=DistillationConfig(
        enabled=True, teacher_cache=str(tmp_path / "cache"), temperature=1.0))  # fmt: skip
    train(live)
    train(cached)
    a, b = _metrics(tmp_path / "a" / "run"), _metrics(tmp_path / "b" / "run")
    for x, y in zip(a[:2], b[:2]):
        assert x["kd_loss"] > 0 and y["kd_loss"] == pytest.approx(x["kd_loss"], rel=1e-4)
        assert y["ce_loss"] == pytest.approx(x["ce_loss"], rel=1e-5)
    with pytest.raises(LoopfitError, match="does not match"):
        setup(_cfg(models, tmp_path / "c", seq_len=16, **common, distillation=DistillationConfig(
            enabled=True, teacher_cache=str(tmp_path / "cache"))))  # fmt: skip


def test_hidden_state_alignment_term(models, tmp_path):
    """`hidden_scale` adds the loop-iteration -> teacher-layer alignment; total = a*CE + (1-a)*KD + s*hidden."""
    dc = DistillationConfig(
        enabled=True, teacher_model_name=str(models / "teacher"), hidden_scale=0.5, ce_scale=0.3, kd_scale=0.7
    )
    train(_cfg(models, tmp_path, max_steps=2, distillation=dc))
    m = _metrics(tmp_path / "run")[0]
    assert m["hidden_loss"] > 0
    assert m["loss"] == pytest.approx(0.3 * m["ce_loss"] + 0.7 * m["kd_loss"] + 0.5 * m["hidden_loss"], rel=1e-5)


def test_hidden_map_last_aligns_the_final_state_with_the_coda_input(models):
    """`hidden_map=last`: only the state after the last iteration, at every depth R, meets the teacher's state
    where the coda begins (the output of the block's last source layer); `spread` pairs every iteration."""
    from loopfit.losses import HiddenStateLoss
    from loopfit.train.student import Student, micro_batch_loss

    student_model = AutoModelForCausalLM.from_pretrained(models / "looped")
    teacher = AutoModelForCausalLM.from_pretrained(models / "teacher").eval()
    c = student_model.config
    span = (c.prelude_layers[-1] + 1, c.block_layers[-1])
    torch.manual_seed(0)
    ids = torch.randint(0, c.vocab_size, (2, 12))
    labels = ids.clone()
    labels[0, :3] = -100
    batch = {"input_ids": ids, "labels": labels}
    mask = torch.nn.functional.pad(labels[:, 1:] != -100, (0, 1), value=False)  # the token losses' positions
    loss = HiddenStateLoss(c.hidden_size, teacher.config.hidden_size)
    t_states = teacher.model(ids, output_hidden_states=True).hidden_states
    for r in (1, 3):
        states = student_model.model(ids, num_steps=r, output_states=True).states
        got = {}
        for how in ("last", "spread"):
            dc = DistillationConfig(enabled=True, teacher_model_name="t", hidden_scale=1.0, hidden_map=how)
            parts = micro_batch_loss(Student(student_model, loss), teacher, batch, r, dc, mask.sum(), loss, span)
            got[how] = parts.hidden
        torch.testing.assert_close(got["last"], loss([states[-1]], [t_states[span[1] + 1]], mask).detach())
        if r > 1:
            assert not torch.allclose(got["last"], got["spread"])
    with pytest.raises(LoopfitError, match="hidden_map"):
        _cfg(models, models, distillation=DistillationConfig(hidden_map="first")).validate()
    with pytest.raises(LoopfitError, match="does nothing without"):
        _cfg(models, models, distillation=DistillationConfig(hidden_map="last")).validate()


def test_fixed_point_term(models, tmp_path):
    """`fixed_point_scale` adds s * ||f(s_R) - s_R||^2 / ||s_R||^2; the residual matches one more iteration run
    by hand (R + 1 iterations), and training with it shrinks the residual on a fixed batch."""
    import shutil

    from loopfit.train.student import Student

    # The identity adapter makes every iteration compute the same state (residual exactly 0); perturb it.
    folder = tmp_path / "looped-moved"
    shutil.copytree(models / "looped", folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    torch.manual_seed(0)
    with torch.no_grad():
        model.model.adapter.weight.add_(0.3 * torch.randn_like(model.model.adapter.weight))
    model.save_pretrained(folder)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    _, _, _, residual, *_ = Student(model)(ids, num_steps=3, fixed_point=True)
    s3 = model.model(ids, num_steps=3, output_states=True).states[-1]
    s4 = model.model(ids, num_steps=4, output_states=True).states[-1]
    torch.testing.assert_close(residual, (s4 - s3).pow(2).sum(-1) / s3.pow(2).sum(-1))
    residual.sum().backward()
    assert model.model.adapter.weight.grad.abs().sum() > 0

    one = str(models / "one_batch.txt")
    cfg = _cfg(models, tmp_path, model_name=str(folder), max_steps=30, data=one, fixed_point_scale=10.0,
               optim_config=OptimConfig(lr=3e-3))  # fmt: skip
    train(cfg)
    m = _metrics(tmp_path / "run")
    assert m[0]["fixed_point_loss"] > 0 and m[0]["num_steps"] == 2  # the extra iteration is not logged as depth
    assert m[0]["loss"] == pytest.approx(m[0]["ce_loss"] + 10.0 * m[0]["fixed_point_loss"], rel=1e-5)
    assert m[-1]["fixed_point_loss"] < 0.5 * m[0]["fixed_point_loss"]
    with pytest.raises(LoopfitError, match="fixed_point_scale"):
        _cfg(models, tmp_path, fixed_point_scale=-1.0).validate()
    with pytest.raises(LoopfitError, match="fixed_point_scale needs a looped student"):
        setup(_cfg(models, tmp_path / "plain", model_name=str(models / "teacher"), fixed_num_steps=None,
                   fixed_point_scale=1.0))  # fmt: skip


@pytest.mark.parametrize("optimizer", ["muon", "ellis_adam"])
def test_other_optimizers_train(models, tmp_path, optimizer):
    from loopfit.train.config import OptimConfig

    cfg = _cfg(models, tmp_path, data=str(models / "one_batch.txt"), max_steps=8,
               optim_config=OptimConfig(optimizer=optimizer, lr=3e-3, muon_lr=2e-2))  # fmt: skip
    run = setup(cfg)
    fit(run)
    run.logger.close()
    kinds = {type(o).__name__ for o in run.optimizers}
    assert kinds == ({"Muon", "AdamW"} if optimizer == "muon" else {"ELLISAdam"})
    m = _metrics(tmp_path / "run")
    assert m[-1]["loss"] < m[0]["loss"]


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_loss_policy(models, tmp_path, policy):
    run = setup(_cfg(models, tmp_path, max_steps=2, nan_policy=policy))
    with torch.no_grad():
        run.model.model.norm.weight.fill_(float("nan"))
    before = {n: p.detach().clone() for n, p in run.trainable}
    if policy == "stop":
        with pytest.raises(LoopfitError, match="non-finite"):
            fit(run)
    else:
        fit(run)
        assert all(x["skipped"] for x in _metrics(tmp_path / "run"))
        assert all(torch.equal(before[n], p) or n == "model.norm.weight" for n, p in run.trainable)
    run.logger.close()


class _Planted(torch.nn.Module):
    """A looped student whose loop states and fixed-point residual are the test's: its per-position alignment and
    residual values are then known exactly."""

    def __init__(self, inner, states, residual):
        super().__init__()
        self.inner, self.states, self.residual = inner, states, residual
        self.model = inner.model  # what the loss reads the student's config from

    def forward(self, input_ids, num_steps=None, output_states=False, fixed_point=False, every_depth=1):
        hidden, _, head_weight, *_ = self.inner(input_ids, num_steps=num_steps)
        return hidden, self.states, head_weight, self.residual, None, (), None


def _aux_terms(labels, value):
    """(hidden term, fixed-point term) of one micro-batch whose per-position alignment MSE and residual are both
    `value` `(B, S)`; num_items is the micro-batch's own count of token-loss positions, as in `train_step`."""
    from loopfit.convert import layout_from_sizes, to_looped
    from loopfit.losses import HiddenStateLoss
    from loopfit.train.student import Student, micro_batch_loss

    teacher = make_tiny_model("llama", num_layers=6, hidden=32)
    looped = to_looped(teacher, layout_from_sizes(6, 1, 2, 1), state_init="zeros")  # prelude 0, block 3-4, coda 5
    span = (1, 4)
    torch.manual_seed(0)
    ids = torch.randint(4, 260, labels.shape)
    with torch.no_grad():  # the output of layer 4, the block's last source layer (not the last layer: not normed)
        target = teacher.model(ids, output_hidden_states=True).hidden_states[span[1] + 1]
    # MSE over the features of a constant offset c is c^2: per position exactly `value`.
    states = (target + value.sqrt()[..., None],)
    student = _Planted(Student(looped), states, value.clone())
    loss = HiddenStateLoss(32, 32, kind="mse")
    dc = DistillationConfig(enabled=True, teacher_model_name="t", hidden_scale=1.0, hidden_map="last")
    num_items = (labels[:, 1:] != -100).sum().float()
    parts = micro_batch_loss(student, teacher, {"input_ids": ids, "labels": labels}, 1, dc, num_items, loss, span,
                             fixed_point_scale=1.0)  # fmt: skip
    return parts.hidden.item(), parts.fixed_point.item()


def test_auxiliary_terms_of_a_constant_are_that_constant():
    """A per-position value v everywhere gives hidden and fixed-point terms of exactly v (packed rows)."""
    labels = torch.randint(4, 260, (2, 12))
    hidden, fp = _aux_terms(labels, torch.full((2, 12), 0.7))
    assert hidden == pytest.approx(0.7, rel=1e-5) and fp == pytest.approx(0.7, rel=1e-5)


def test_auxiliary_terms_score_the_token_losses_positions():
    """Assistant-only masking and right padding: the hidden and fixed-point terms average exactly the positions the
    CE/KD terms score (position t where labels[t + 1] is a target), no others."""
    labels = torch.randint(4, 260, (3, 12))
    labels[0, :4] = -100  # prompt
    labels[1, :2] = -100  # prompt ...
    labels[1, 9:] = -100  # ... and padding
    labels[2, 7:] = -100  # padding only
    pos = torch.arange(12, dtype=torch.float32)
    value = 1.0 + pos[None] + 100.0 * torch.arange(3, dtype=torch.float32)[:, None]
    want = value[:, :-1][labels[:, 1:] != -100].mean().item()
    hidden, fp = _aux_terms(labels, value)
    assert hidden == pytest.approx(want, rel=1e-5) and fp == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("hidden_map", ["spread", "last"])
@pytest.mark.parametrize("layers", ["0-1:2-3:4-5", "0-3:4-5:", ":0-5:", "0:1-4:5"])
def test_student_equal_to_teacher_has_zero_hidden_loss(arch, layers, hidden_map):
    """Every teacher target is the residual stream at its layer boundary: a looped student that computes exactly the
    teacher (no layer dropped, R = 1, identity adapter) scores 0, also where the block ends at the last layer (no
    coda), whose HF `hidden_states` entry is the final-normed output instead."""
    from loopfit.convert import parse_layout, to_looped
    from loopfit.losses import HiddenStateLoss
    from loopfit.train.student import Student, micro_batch_loss

    teacher = make_tiny_model(arch, num_layers=6, hidden=32)
    student = to_looped(teacher, parse_layout(layers, 6), adapter_init="identity", state_init="zeros").eval()
    c = student.config
    span = (c.prelude_layers[-1] + 1 if c.prelude_layers else 0, c.block_layers[-1])
    torch.manual_seed(0)
    ids = torch.randint(4, 260, (2, 10))
    labels = ids.clone()
    labels[0, :3] = -100
    num_items = (labels[:, 1:] != -100).sum().float()
    for kind in ("cosine", "mse"):
        loss = HiddenStateLoss(32, 32, kind=kind)
        dc = DistillationConfig(enabled=True, teacher_model_name="t", hidden_scale=1.0, hidden_map=hidden_map)
        with torch.no_grad():
            parts = micro_batch_loss(Student(student, loss), teacher, {"input_ids": ids, "labels": labels}, 1, dc,
                                     num_items, loss, span)  # fmt: skip
        assert parts.hidden.abs().item() < 1e-6, (kind, parts.hidden.item())


def test_teacher_forward_reads_the_residual_stream_of_the_layers_asked_for():
    from loopfit.train.student import teacher_forward

    teacher = make_tiny_model("llama", num_layers=6, hidden=32)
    ids = torch.randint(4, 260, (2, 7))
    with torch.no_grad():
        ref = teacher.model(ids, output_hidden_states=True)
    hooks = [len(m._forward_hooks) for m in teacher.modules()]  # HF installs its own on the first call
    final, states = teacher_forward(teacher, ids, [5, 1, 5])
    torch.testing.assert_close(final, ref.last_hidden_state, rtol=0, atol=0)
    assert sorted(states) == [1, 5] and not any(h.requires_grad for h in states.values())
    torch.testing.assert_close(states[1], ref.hidden_states[2], rtol=0, atol=0)
    torch.testing.assert_close(teacher.model.norm(states[5]), ref.hidden_states[6], rtol=0, atol=0)  # HF's is normed
    assert [len(m._forward_hooks) for m in teacher.modules()] == hooks  # ours are gone
    with pytest.raises(LoopfitError, match="out of range"):
        teacher_forward(teacher, ids, [6])
    with pytest.raises(LoopfitError, match="decoder layers"):
        teacher_forward(torch.nn.Module(), ids, [0])


def test_cli_mixes_several_data_sources_and_resumes(models, tmp_path):
    """`loopfit train --data a:w --data b:w` mixes by token share (as `loopfit prepare` does), records both sources
    in the run's data manifest, and the finished run resumes from the same command (the list is compared as is)."""
    from loopfit.cli import main

    (tmp_path / "b.txt").write_text("\n\n".join(p[::-1] for p in TEXT.split("\n\n")))
    out = tmp_path / "run"
    argv = ["train", "--model_name", str(models / "looped"), "--out", str(out), "--seq_len", "32",
            "--batch_size", "2", "--max_steps", "2", "--fixed_num_steps", "2", "--progress_bar", "false",
            "--tensorboard", "false", "--data", f"{models / 'data.txt'}:0.5",
            "--data", f"{tmp_path / 'b.txt'}:0.5"]  # fmt: skip
    main(argv)
    sources = json.loads((out / "data_manifest.json").read_text())["sources"]
    assert [(s["spec"], s["weight"]) for s in sources] == [
        (str(models / "data.txt"), 0.5),
        (str(tmp_path / "b.txt"), 0.5),
    ]
    assert all(s["train_tokens_used"] > 0 for s in sources)
    assert len(_metrics(out)) == 2
    main([*argv, "--resume", "true"])  # finished: the same sources resume (and change nothing)
    assert len(_metrics(out)) == 2


def test_bf16_slower_than_fp32_on_this_cpu_is_said_at_start(models, tmp_path, capsys, monkeypatch):
    """Where bf16 matmuls are emulated (an AVX2-only CPU), `--precision bf16` says so once at start."""
    from loopfit.train import metrics

    cpu = torch.device("cpu")
    monkeypatch.setattr(metrics, "_PEAKS", {("cpu", torch.bfloat16): 5e9, ("cpu", torch.float32): 40e9})
    assert "run at 5.0 GFLOP/s against 40.0 in float32" in metrics.slow_bf16_warning(cpu)
    assert "8.0x faster" in metrics.slow_bf16_warning(cpu)
    assert metrics.slow_bf16_warning(torch.device("cuda")) is None
    run = setup(_cfg(models, tmp_path, precision="bf16", max_steps=1))
    run.logger.close()
    assert capsys.readouterr().err.count("loopfit: warning: bf16 matmuls on this CPU") == 1
    # A CPU with native bf16 (as fast as float32 or faster), or an fp32 run: nothing said.
    monkeypatch.setattr(metrics, "_PEAKS", {("cpu", torch.bfloat16): 80e9, ("cpu", torch.float32): 40e9})
    assert metrics.slow_bf16_warning(cpu) is None
    run = setup(_cfg(models, tmp_path, precision="bf16", max_steps=1, overwrite=True))
    run.logger.close()
    monkeypatch.setattr(metrics, "_PEAKS", {("cpu", torch.bfloat16): 5e9, ("cpu", torch.float32): 40e9})
    run = setup(_cfg(models, tmp_path, max_steps=1, overwrite=True))
    run.logger.close()
    assert "bf16 matmuls" not in capsys.readouterr().err


def test_matmul_peak_is_the_best_size_and_skips_sizes_too_slow_for_the_time(monkeypatch):
    """The MFU denominator on a CPU is the best of n = 1024, 1536, 2048 (oneDNN's speed depends on the shape: on an
    AMX Xeon bf16 ran 1.7x faster at 2048 than at 1024); a size one product of which would overrun its share of the
    time is not tried (emulated bf16 at a few GFLOP/s); a GPU measures n = 8192 once. And a real measurement is a
    positive rate at least that of n = 1024 measured alone, give or take timing noise."""
    from loopfit.train import metrics

    calls = []

    def fake(rates):
        def rate(device, dtype, n, seconds):
            calls.append((n, round(seconds, 3)))
            return rates[n]

        return rate

    cpu = torch.device("cpu")
    monkeypatch.setattr(metrics, "_rate", fake({1024: 1.3e12, 1536: 2.2e12, 2048: 2.0e12}))
    assert metrics._measure(cpu, torch.bfloat16, 0.9) == 2.2e12
    assert calls == [(1024, 0.3), (1536, 0.3), (2048, 0.3)]
    calls.clear()  # 5 GFLOP/s: a 1536 product (7.2 GFLOP) would take 1.4 s of a 0.3 s share
    monkeypatch.setattr(metrics, "_rate", fake({1024: 5e9, 1536: 9e9, 2048: 9e9}))
    assert metrics._measure(cpu, torch.bfloat16, 0.9) == 5e9
    assert calls == [(1024, 0.3)]
    calls.clear()
    monkeypatch.setattr(metrics, "_rate", fake({8192: 7e14}))
    assert metrics._measure(torch.device("cuda"), torch.bfloat16, 0.9) == 7e14
    assert calls == [(8192, 0.9)]
    monkeypatch.undo()
    # Two timings on a shared CPU can differ by more than the 30% slack when another process takes a core between
    # them, so a busy machine gets three tries; a measurement that is wrong (zero, or a fraction of n = 1024's) fails
    # all three.
    for _ in range(3):
        best = metrics._measure(cpu, torch.float32, 0.3)
        alone = metrics._rate(cpu, torch.float32, 1024, 0.1)
        assert best > 0 and alone > 0
        if best > 0.7 * alone:
            break
    else:
        raise AssertionError(f"the peak {best:.3g} FLOP/s is below 0.7x n = 1024's {alone:.3g} in three tries")


def test_bf16_run_scores_logits_with_bf16_products(models, tmp_path, logits_dtypes):
    """`--precision bf16`: the fused loss's lm_head products (student and teacher) run in bf16 like the model's
    other linear layers (autocast does not reach inside the fused loss by itself), and training still works: the
    loss falls on a fixed batch and every trainable (float32) parameter changes."""
    cfg = _cfg(models, tmp_path, precision="bf16", max_steps=8, data=str(models / "one_batch.txt"),
               lora=LoRAConfig(enabled=True, r=4, modules_to_save=["adapter"]),
               distillation=DistillationConfig(enabled=True, teacher_model_name=str(models / "teacher")))  # fmt: skip
    cfg.optim_config.lr = 1e-2
    run = setup(cfg)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    fit(run)
    run.logger.close()
    assert logits_dtypes and set(logits_dtypes) == {(torch.bfloat16,) * 3}
    after = dict(run.model.named_parameters())
    unchanged = [n for n, p in before.items() if after[n].dtype != torch.float32 or torch.equal(after[n], p)]
    assert not unchanged, unchanged
    m = _metrics(tmp_path / "run")
    assert m[-1]["loss"] < 0.9 * m[0]["loss"], (m[0]["loss"], m[-1]["loss"])
