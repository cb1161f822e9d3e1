"""On-policy distillation in `loopfit train` (`--distillation.on_policy.*`), on tiny models: the completions trained
on are the student's own samples at the step's depth, the labels cover only them, the loss is the configured
divergence on them, lmbda = 0 is today's off-policy run exactly, every trainable parameter learns, resume is exact."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import write_teacher_and_looped_student
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from loopfit.errors import LoopfitError
from loopfit.losses import kd_divergence
from loopfit.models.prepacked import prepacked_linears
from loopfit.models.sampling import sample
from loopfit.train import DistillationConfig, LoRAConfig, OnPolicyConfig, TrainConfig
from loopfit.train.on_policy import OnPolicy, completion_rows, left_pad, on_policy_step
from loopfit.train.recipe import depth_at, fit, setup, train
from loopfit.train.student import base_model, lora_merged, objective_loss

pytestmark = pytest.mark.usefixtures("one_thread")

EOS, PAD = 2, 0  # the tiny tokenizer's <|im_end|> and <pad>


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = write_teacher_and_looped_student(tmp_path_factory.mktemp("on_policy"))
    with open(root / "qa.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"question": f"fox {i}{'?' * (i % 4)}", "answer": f"dog {i % 5}."}) + "\n")
    return root


def _cfg(models, tmp_path, on_policy: dict | None = None, **kw) -> TrainConfig:
    base = dict(
        model_name=str(models / "looped"),
        out=str(tmp_path / "run"),
        data=str(models / "qa.jsonl"),
        chat=True,
        assistant_only=True,
        seq_len=48,
        batch_size=4,
        max_steps=3,
        progress_bar=False,
        tensorboard=False,
        lora=LoRAConfig(enabled=True, r=4, modules_to_save=["adapter"]),
        distillation=DistillationConfig(enabled=True, teacher_model_name=str(models / "teacher"),
                                        on_policy=OnPolicyConfig(**{"max_new_tokens": 8} | (on_policy or {}))),
    )  # fmt: skip
    base.update(kw)
    cfg = TrainConfig(**base)
    cfg.optim_config.lr = 1e-2
    return cfg


def _metrics(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_completion_rows_label_only_the_completion_through_its_first_eos():
    prompts = [[5, 6, 7], [8], [9, 10]]
    completions = torch.tensor([[11, EOS, PAD, PAD], [12, 13, 14, 15], [EOS, 16, EOS, PAD]])
    rows = completion_rows(prompts, completions, [EOS], PAD)
    assert rows["input_ids"].tolist() == [
        [5, 6, 7, 11, EOS],
        [8, 12, 13, 14, 15],
        [9, 10, EOS, PAD, PAD],
    ]
    assert rows["labels"].tolist() == [
        [-100, -100, -100, 11, EOS],
        [-100, 12, 13, 14, 15],  # never ended: all its tokens
        [-100, -100, EOS, -100, -100],  # the first EOS is scored, what follows it is not
    ]
    packed = completion_rows(prompts, completions, [EOS], PAD, packed=True)
    assert packed["input_ids"].tolist() == [[5, 6, 7, 11, EOS, 8, 12, 13, 14, 15, 9, 10, EOS]]
    assert packed["labels"].tolist() == [[-100, -100, -100, 11, EOS, -100, 12, 13, 14, 15, -100, -100, EOS]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2]]
    ids, mask = left_pad(prompts, PAD)
    assert ids.tolist() == [[5, 6, 7], [PAD, PAD, 8], [PAD, 9, 10]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]


def test_completions_are_the_students_own_samples_at_the_drawn_depth(models, tmp_path):
    cfg = _cfg(models, tmp_path, on_policy={"lmbda": 1.0, "temperature": 0.7, "top_p": 0.9})
    run = setup(cfg)
    tok = run.tokenizer
    _, _, num_steps = depth_at(run, 0)
    batches, objective, extra = on_policy_step(run, num_steps)
    last = run.on_policy.last
    assert last["num_steps"] == sum(num_steps) and len(batches) == 1
    (batch,) = batches
    rows, labels = batch["input_ids"], batch["labels"]
    prompts = [run.on_policy.prompts[i] for i in last["indices"][0]]
    # The prompts are the data's, rendered as training renders them: the chat template through the generation prompt.
    texts = [tok.decode(p) for p in prompts]
    assert all(t.startswith("<|im_start|>user\nfox ") and t.endswith("<|im_start|>assistant\n") for t in texts)
    # What was trained on is what the sampler draws with the same seed and depth (tests/test_sampling.py: what an
    # uncached forward of the student in eval mode predicts).
    ids, mask = left_pad(prompts, PAD)
    g = torch.Generator().manual_seed(last["seeds"][0])
    generated = sample(run.model, ids, mask, 8, [EOS], PAD, g, 0.7, 0.9, sum(num_steps))
    assert run.model.training
    assert extra["generated_tokens"] == int((labels != -100).sum()) > 0
    for i, p in enumerate(prompts):
        n = int((labels[i] != -100).sum())
        assert rows[i, : len(p)].tolist() == p and (labels[i, : len(p)] == -100).all()
        completion = generated[i].tolist()
        expect = completion[: completion.index(EOS) + 1] if EOS in completion else completion
        assert n == len(expect)
        assert labels[i, len(p) : len(p) + n].tolist() == expect == rows[i, len(p) : len(p) + n].tolist()
        assert (labels[i, len(p) + n :] == -100).all() and (rows[i, len(p) + n :] == PAD).all()
    # A sampling seed of its own: the global RNG is where it was.
    state = torch.get_rng_state()
    on_policy_step(run, num_steps)
    assert torch.equal(state, torch.get_rng_state())
    run.logger.close()


@pytest.mark.parametrize("kind, params", [("rkl", {}), ("jsd", {"beta": 0.3})])
def test_on_policy_loss_is_the_divergence_on_completion_tokens_only(models, tmp_path, kind, params):
    cfg = _cfg(models, tmp_path, on_policy={"lmbda": 1.0, "kind": kind, "kind_params": params})
    cfg.distillation.temperature = 1.5
    run = setup(cfg)
    _, _, num_steps = depth_at(run, 0)
    (batch,), objective, _ = on_policy_step(run, num_steps)
    labels = batch["labels"]
    num_items = (labels[:, 1:] != -100).sum().float()
    parts = objective_loss(objective, run.student, run.teacher, batch, num_steps, num_items)
    with torch.no_grad():
        logits = base_model(run.model)(batch["input_ids"], num_steps=num_steps).logits[:, :-1].float()
        t_logits = run.teacher(batch["input_ids"]).logits[:, :-1].float()
    y = labels[:, 1:]
    T = 1.5
    if kind == "rkl":  # KL(q || p) on the completion positions, x T^2, a mean over them
        logq, logp = F.log_softmax(logits[y != -100] / T, -1), F.log_softmax(t_logits[y != -100] / T, -1)
        expect = (logq.exp() * (logq - logp)).sum(-1).mean() * T**2
    else:
        expect = kd_divergence(logits, t_logits, y, kind="jsd", beta=0.3, temperature=T)
    assert objective.scales == (0.0, 0.5)  # no CE on the student's own samples; the run's KD weight (kd_scale)
    assert math.isclose(float(parts.kd), float(expect), rel_tol=1e-4)
    assert math.isclose(float(parts.total), 0.5 * float(expect), rel_tol=1e-4)
    run.logger.close()


def test_packed_on_policy_rows_score_as_the_padded_ones(models, tmp_path):
    """With `--position_ids=true` a micro-batch's prompt + completion rows come packed in one row with per-row
    positions; its on-policy loss equals the same rows right-padded."""
    run = setup(_cfg(models, tmp_path, on_policy={"lmbda": 1.0}, position_ids=True))
    _, _, num_steps = depth_at(run, 0)
    (batch,), objective, _ = on_policy_step(run, num_steps)
    pos = batch["position_ids"]
    assert batch["input_ids"].shape[0] == 1 and int((pos == 0).sum()) == 4  # the batch's 4 rows in one
    starts = [*torch.nonzero(pos[0] == 0).flatten().tolist(), pos.shape[1]]
    pieces = [(batch["input_ids"][0, a:b], batch["labels"][0, a:b]) for a, b in zip(starts[:-1], starts[1:])]
    width = max(len(ids) for ids, _ in pieces)
    padded = {"input_ids": torch.zeros(4, width, dtype=torch.long), "labels": torch.full((4, width), -100)}
    for i, (ids, labels) in enumerate(pieces):
        padded["input_ids"][i, : len(ids)], padded["labels"][i, : len(ids)] = ids, labels
    num_items = (batch["labels"][:, 1:] != -100).sum().float()
    assert int((padded["labels"][:, 1:] != -100).sum()) == int(num_items) > 0
    with torch.no_grad():
        got = objective_loss(objective, run.student, run.teacher, batch, num_steps, num_items)
        want = objective_loss(objective, run.student, run.teacher, padded, num_steps, num_items)
    assert float(want.kd) > 0 and math.isclose(float(got.kd), float(want.kd), rel_tol=1e-5)
    run.logger.close()


def test_lmbda_zero_is_the_off_policy_run_exactly(models, tmp_path):
    """lmbda = 0 (the default) changes nothing; a tiny lmbda builds the whole machinery (prompts, a coin every step)
    but never flips, and leaves the run as it was too: same losses, same weights."""
    results = []
    for name, op in [("off", {}), ("zero", {"lmbda": 0.0, "kind": "jsd"}), ("tiny", {"lmbda": 1e-12})]:
        cfg = _cfg(models, tmp_path / name, on_policy=op, fixed_num_steps=None, max_steps=3)
        run = setup(cfg)
        assert (run.on_policy is None) == (name != "tiny")
        fit(run)
        run.logger.close()
        m = _metrics(tmp_path / name / "run")
        assert all(not x.get("on_policy", False) for x in m)
        results.append(([[x[k] for k in ("loss", "ce_loss", "kd_loss", "num_steps")] for x in m],
                        {n: p.detach().clone() for n, p in run.trainable}))  # fmt: skip
    (m0, w0), *rest = results
    for m, w in rest:
        assert m == m0
        assert all(torch.equal(w0[n], w[n]) for n in w0)


def test_on_policy_training_changes_every_trainable_parameter(models, tmp_path):
    cfg = _cfg(models, tmp_path, on_policy={"lmbda": 1.0}, max_steps=3, gradient_accumulation_steps=2)
    run = setup(cfg)
    before = {n: p.detach().clone() for n, p in run.trainable}
    fit(run)
    run.logger.close()
    m = _metrics(tmp_path / "run")
    assert all(x["on_policy"] and x["generated_tokens"] > 0 for x in m)
    assert all(math.isfinite(x["loss"]) and math.isfinite(x["grad_norm"]) and x["loss"] > 0 for x in m)
    assert all(x["num_items"] == x["generated_tokens"] for x in m)  # the loss's tokens are the completions'
    assert any("lora_" in n for n in before) and any("adapter" in n for n in before)
    unchanged = [n for n, p in run.trainable if torch.equal(before[n], p.detach())]
    assert unchanged == []


def test_start_step_keeps_the_first_steps_off_policy_and_the_coin_where_it_would_be(models, tmp_path):
    """start_step 2: steps 1-2 are the off-policy run's exactly; the coins of steps 1-2 were still drawn, so step 3's
    sampling seed is the generator's draw after three coins (an on-policy step draws its seeds from it too)."""
    seen = {}
    for name, op in [("off", {}), ("late", {"lmbda": 1.0, "start_step": 2}), ("now", {"lmbda": 1.0})]:
        run = setup(_cfg(models, tmp_path / name, on_policy=op, max_steps=3))
        fit(run, until=2)
        m2 = _metrics(tmp_path / name / "run")
        fit(run)
        run.logger.close()
        m = _metrics(tmp_path / name / "run")
        seen[name] = ([x.get("on_policy", False) for x in m], [x["loss"] for x in m2],
                      run.on_policy.last if run.on_policy else None)  # fmt: skip
    assert seen["late"][0] == [False, False, True] and seen["now"][0] == [True, True, True]
    assert seen["late"][1] == seen["off"][1][:2]  # the first two steps: off-policy, as the run without it
    g = torch.Generator().manual_seed(run.cfg.seed + 104_729)
    coins = torch.rand(3, generator=g, dtype=torch.float64)
    assert (coins < 1.0).all() and seen["late"][2]["seeds"] == [int(torch.randint(0, 2**62, (), generator=g))]


def test_coin_is_seeded_and_drawn_at_every_step():
    def flips(lmbda, seed):
        op = OnPolicy(OnPolicyConfig(lmbda=lmbda), [[5]] * 4, _objective(), 2, seed, [EOS], PAD)
        return [op.flip() for _ in range(2000)]

    half = flips(0.5, 0)
    assert half == flips(0.5, 0) and half != flips(0.5, 1)
    assert abs(sum(half) / 2000 - 0.5) < 0.05
    assert not any(flips(0.0, 0)) and all(flips(1.0, 0))
    assert [a < 0.3 for a in torch.rand(5, generator=torch.Generator().manual_seed(104_729), dtype=torch.float64)] == (
        flips(0.3, 0)[:5]
    )


def _objective():
    from loopfit.losses.objective import Objective, ObjectiveWeights

    return Objective(ObjectiveWeights(ce_scale=0.5, kd_scale=0.5), teacher="live")


def test_resume_is_exact(models, tmp_path):
    """6 steps straight == 4 steps (checkpoint at 2), a kill, a resume: the same coins, samples, losses, weights."""
    kw = dict(on_policy={"lmbda": 0.5}, fixed_num_steps=None, max_steps=6, save_every=2)
    straight = _cfg(models, tmp_path / "a", **kw)
    train(straight)
    run = setup(_cfg(models, tmp_path / "b", **kw))
    fit(run, until=4)
    run.logger.close()
    train(_cfg(models, tmp_path / "b", resume=True, **kw))
    a, b = _metrics(tmp_path / "a" / "run"), _metrics(tmp_path / "b" / "run")
    keys = ("step", "loss", "kd_loss", "num_steps", "grad_norm", "on_policy", "generated_tokens", "num_items")
    rows = [[x.get(k) for k in keys] for x in a]
    assert rows == [[x.get(k) for k in keys] for x in b]
    assert 0 < sum(x["on_policy"] for x in a) < 6  # both kinds of step happened
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "a" / "run" / "final" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "run" / "final" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # A resume refuses on-policy settings that differ from the run's.
    with pytest.raises(LoopfitError, match="distillation.on_policy.top_p"):
        setup(_cfg(models, tmp_path / "b", resume=True, **(kw | {"on_policy": {"lmbda": 0.5, "top_p": 0.9}})))


@pytest.mark.parametrize(
    "on_policy, kw, match",
    [
        ({"lmbda": 1.5}, {}, "lmbda must be"),
        ({"lmbda": -0.1}, {}, "lmbda must be"),
        ({"lmbda": 0.5, "max_new_tokens": 0}, {}, "max_new_tokens must be >= 1"),
        ({"lmbda": 0.5, "temperature": 0.0}, {}, "on_policy.temperature must be"),
        ({"lmbda": 0.5, "top_p": 0.0}, {}, "top_p must be"),
        ({"lmbda": 0.5, "top_p": 1.5}, {}, "top_p must be"),
        ({"lmbda": 0.5, "kind": "kl"}, {}, "on_policy.kind must be one of"),
        ({"lmbda": 0.5, "kind": "jsd", "kind_params": {"beta": 2.0}}, {}, "on_policy.kind_params"),
        ({"lmbda": 0.5, "max_new_tokens": 48}, {}, "must be below --seq_len"),
        ({"lmbda": 0.5}, {"parallel": "fsdp"}, "use --parallel ddp or none"),
        ({"lmbda": 0.5}, {"data": "TEXT"}, "no prompt/response pairs"),
        ({"lmbda": 0.5, "max_new_tokens": 40}, {}, "no prompt of .* fits"),
        ({"lmbda": 0.5, "start_step": -1}, {}, "start_step must be >= 0"),
        ({"lmbda": 0.5, "start_step": 3}, {"max_steps": 3}, "start_step .* must be below the run's 3 steps"),
    ],
)
def test_nonsense_refused_at_start(models, tmp_path, on_policy, kw, match):
    if kw.get("data") == "TEXT":
        kw = kw | {"data": str(models / "data.txt"), "chat": False, "assistant_only": False}
    with pytest.raises(LoopfitError, match=match):
        setup(_cfg(models, tmp_path, on_policy=on_policy, **kw))
    assert not (tmp_path / "run").exists()  # refused before anything is written


@pytest.mark.parametrize(
    "dist, match", [({"enabled": False}, "needs a live teacher"), ({"ce_scale": 1.0, "kd_scale": 0.0}, "KD term alone")]
)
def test_on_policy_needs_a_teacher_and_a_kd_term(models, tmp_path, dist, match):
    cfg = _cfg(models, tmp_path, on_policy={"lmbda": 0.5})
    for k, v in dist.items():
        setattr(cfg.distillation, k, v)
    if not cfg.distillation.enabled:
        cfg.distillation.teacher_model_name = None
    with pytest.raises(LoopfitError, match=match):
        cfg.validate()


def test_hf_distillation_trainer_refuses_on_policy(models, tmp_path):
    from transformers import AutoModelForCausalLM, TrainingArguments

    from loopfit.hf import DistillationTrainer

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], save_strategy="no", use_cpu=True)
    dcfg = DistillationConfig(enabled=True, on_policy=OnPolicyConfig(lmbda=0.5))
    with pytest.raises(LoopfitError, match="TRL's GKDTrainer"):
        DistillationTrainer(model=AutoModelForCausalLM.from_pretrained(models / "looped"), args=args,
                            teacher_model=AutoModelForCausalLM.from_pretrained(models / "teacher"),
                            distillation=dcfg)  # fmt: skip


def test_plain_student_samples_on_policy(models, tmp_path):
    """A non-looped student: the same on-policy steps, sampled and trained without a depth."""
    from conftest import make_tiny_model, make_tiny_tokenizer

    make_tiny_model("llama", num_layers=2, hidden=32, seed=1).save_pretrained(tmp_path / "plain")
    make_tiny_tokenizer().save_pretrained(tmp_path / "plain")
    cfg = _cfg(models, tmp_path, on_policy={"lmbda": 1.0}, model_name=str(tmp_path / "plain"), max_steps=3)
    cfg.lora.modules_to_save = None
    run = setup(cfg)
    before = {n: p.detach().clone() for n, p in run.trainable}
    fit(run)
    run.logger.close()
    m = _metrics(tmp_path / "run")
    assert run.on_policy.last["num_steps"] is None
    assert all(x["on_policy"] and x["generated_tokens"] > 0 and math.isfinite(x["loss"]) for x in m)
    assert [n for n, p in run.trainable if torch.equal(before[n], p.detach())] == []


def _perturb_lora(model, seed: int = 0) -> None:
    """Give every LoRA B a random value (it starts at zero, where merged and unmerged agree trivially)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_merged_lora_computes_the_same_function_with_one_matmul_and_leaves_the_weights_untouched(models, tmp_path):
    run = setup(_cfg(models, tmp_path, on_policy={"lmbda": 1.0}))
    model = run.model.eval()
    _perturb_lora(model)
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    lora_layers = [m for m in model.modules() if type(m) is LoraLinear]
    calls = []
    hooks = [m.lora_A["default"].register_forward_hook(lambda *a: calls.append(1)) for m in lora_layers]
    ids = torch.randint(3, 100, (2, 12))
    with torch.no_grad():
        want = model(input_ids=ids, num_steps=3).logits
        assert calls, "the unmerged forward runs the adapters"
        calls.clear()
        with lora_merged(model) as n:
            got = model(input_ids=ids, num_steps=3).logits
            assert not calls, "merged: the adapters' matmuls are not run"
            # ... nor PEFT's wrapper: each parent calls the base layer, holding the merged weight, directly.
            assert not any(type(m) is LoraLinear for m in model.modules())
            assert all(m.get_base_layer() in set(model.modules()) for m in lora_layers)
        assert [m for m in model.modules() if type(m) is LoraLinear] == lora_layers
        after = model(input_ids=ids, num_steps=3).logits
    assert n == len(lora_layers) > 0
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    with torch.no_grad(), model.disable_adapter():
        assert (model(input_ids=ids, num_steps=3).logits - want).abs().max() > 1e-3  # the update matters here
    assert torch.equal(after, want)

    def unchanged():
        # The very same parameters, bit for bit (an in-place merge and unmerge would round the base weights).
        for name, p in model.named_parameters():
            assert p is before[name][0] and torch.equal(p, before[name][1]), name
        assert not any(m.merged for m in lora_layers)

    unchanged()
    # Restored after an exception too; a model with its adapters disabled merges nothing.
    with pytest.raises(RuntimeError, match="boom"), lora_merged(model):
        raise RuntimeError("boom")
    unchanged()
    with model.disable_adapter(), lora_merged(model) as n:
        assert n == 0
    for h in hooks:
        h.remove()
    run.logger.close()


@pytest.mark.parametrize(("merge", "prepack"), [(True, True), (True, False), (False, True), (False, False)])
def test_on_policy_samples_from_the_merged_or_the_unmerged_adapters(models, tmp_path, merge, prepack):
    on_policy = {"lmbda": 1.0, "merge_lora": merge, "prepack": prepack, "max_new_tokens": 12}
    run = setup(_cfg(models, tmp_path, on_policy=on_policy))
    _perturb_lora(run.model)
    _, _, num_steps = depth_at(run, 0)
    (batch,), _, _ = on_policy_step(run, num_steps)
    last = run.on_policy.last
    prompts = [run.on_policy.prompts[i] for i in last["indices"][0]]
    ids, mask = left_pad(prompts, PAD)
    model = run.model
    with contextlib.ExitStack() as stack:
        if merge:
            stack.enter_context(lora_merged(model))
        if prepack:  # same packing as the sampler's; its forwards must have run
            packed = stack.enter_context(prepacked_linears(model, len(prompts)))
        g = torch.Generator().manual_seed(last["seeds"][0])
        generated = sample(model, ids, mask, 12, [EOS], PAD, g, 1.0, 1.0, sum(num_steps))
        assert not prepack or sum(p.calls for p in packed) > 0
    for i, p in enumerate(prompts):
        n = int((batch["labels"][i] != -100).sum())
        assert batch["input_ids"][i, len(p) : len(p) + n].tolist() == generated[i, :n].tolist()
    run.logger.close()


def test_the_students_generation_config_sampling_settings_are_named_as_ignored(models, tmp_path, capsys):
    import shutil

    student = tmp_path / "student"
    shutil.copytree(models / "looped", student)
    gen = json.loads((student / "generation_config.json").read_text()) if (
        student / "generation_config.json").exists() else {}  # fmt: skip
    (student / "generation_config.json").write_text(json.dumps(gen | {"repetition_penalty": 1.5}))
    run = setup(_cfg(models, tmp_path, on_policy={"lmbda": 1.0}, model_name=str(student)))
    err = capsys.readouterr().err
    assert "on-policy: the student's generation_config sets repetition_penalty=1.5; on-policy samples ignore it" in err
    run.logger.close()
    run = setup(_cfg(models, tmp_path / "plain", on_policy={"lmbda": 1.0}))
    assert "generation_config sets" not in capsys.readouterr().err
    run.logger.close()


def _tiny_attention():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(8, 8)

        def forward(self, x):
            return self.q_proj(x)

    return nn.Sequential(Block())


def test_lora_merged_leaves_stacked_adapters_and_lora_bias_unmerged_or_exact():
    from peft import LoHaConfig, LoraConfig, get_peft_model

    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    # LoRA over a LoHa layer (a PEFT mixed model): the wrapper reaches the linear through the LoHa layer, which
    # must stay in the call.
    mixed = get_peft_model(_tiny_attention(), LoHaConfig(r=2, target_modules=["q_proj"], init_weights=False),
                           adapter_name="b", mixed=True)  # fmt: skip
    mixed.add_adapter("a", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    mixed.set_adapter(["a", "b"])
    # A LoRA whose B has a bias (`lora_bias`): W + s B A would leave it out, so the layer is not merged.
    biased = get_peft_model(_tiny_attention(), LoraConfig(r=2, target_modules=["q_proj"], lora_bias=True,
                                                           init_lora_weights=False))  # fmt: skip
    with torch.no_grad():
        nn.init.normal_(biased.base_model.model[0].q_proj.lora_B["default"].bias)
        for model, merged in ((mixed, 1), (biased, 0)):
            want = model(x)
            with lora_merged(model) as n:
                got = model(x)
            assert n == merged
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(model(x), want, atol=0, rtol=0)


def test_sampling_a_diverged_student_is_one_loopfit_error():
    from conftest import make_tiny_model

    from loopfit.convert import layout_from_sizes, to_looped
    from loopfit.train.on_policy import sample_completions

    model = to_looped(make_tiny_model("llama", num_layers=6, hidden=32), layout_from_sizes(6, 1, 2, 1))
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(LoopfitError, match="on-policy sampling failed: sampling: the model's next-token probabilities"):
        sample_completions(model, [[5, 6, 7]], OnPolicyConfig(lmbda=1.0, max_new_tokens=4), 0, 2, [EOS], PAD)
