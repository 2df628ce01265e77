"""The transformers Trainer callback (optional extra ``hf``): injects, ramps per optimizer step, logs, resumes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import dropblock_inject as dbi

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from dropblock_inject.hf import DropBlockCallback  # noqa: E402

SIZE = (3, 64, 64)
STEPS = 8  # the uninterrupted run; checkpoints every 3 steps


def tiny_resnet() -> torch.nn.Module:
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1],
                                       num_labels=3)  # fmt: skip
    torch.manual_seed(0)
    return transformers.ResNetForImageClassification(config)


class TinyImages(torch.utils.data.Dataset):
    """32 random 64x64 images with labels in {0, 1, 2}, as the Trainer's default collator takes them."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(32, *SIZE, generator=g), torch.randint(0, 3, (32,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


class RateProbe(transformers.TrainerCallback):
    """Records ``(global step, rate of each DropBlock)`` as each optimizer step begins, and the drops."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, list[float]]] = []
        self.dropped = 0

    def on_train_begin(self, args, state, control, model=None, **kw) -> None:
        for m in model.modules():
            if isinstance(m, dbi.DropBlock):
                m.register_forward_hook(self._count)

    def on_step_begin(self, args, state, control, model=None, **kw) -> None:
        blocks = [m for m in model.modules() if isinstance(m, dbi.DropBlock)]
        self.seen.append((state.global_step, [m.target_rate * m.factor_value for m in blocks]))

    def _count(self, module, inputs, output) -> None:
        if module.training:
            self.dropped += int((output == 0).sum())  # a norm's output is never exactly 0 unless dropped


def make_trainer(tmp_path, callbacks: list, max_steps: int = STEPS, model=None, **args_kw):
    args_kw = {"save_strategy": "steps", "save_steps": 3, **args_kw}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=0.01,
        logging_steps=1, report_to="none", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0,
        **args_kw,
    )  # fmt: skip
    return transformers.Trainer(model=model or tiny_resnet(), args=args, train_dataset=TinyImages(),
                                callbacks=callbacks)  # fmt: skip


def train(tmp_path, callbacks: list, max_steps: int = STEPS, model=None, resume=None, **args_kw):
    trainer = make_trainer(tmp_path, callbacks, max_steps, model, **args_kw)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.fixture(scope="module", autouse=True)
def quiet_saves():
    """transformers draws a progress bar on stderr for each checkpoint it writes: not ours to check."""
    transformers.utils.logging.disable_progress_bar()
    yield
    transformers.utils.logging.enable_progress_bar()


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    """The uninterrupted run: its folder, trainer, callback and probe (stderr checked by the test that asks)."""
    tmp_path = tmp_path_factory.mktemp("whole")
    callback, probe = DropBlockCallback(input_size=SIZE), RateProbe()
    trainer = train(tmp_path, [callback, probe])
    return tmp_path, trainer, callback, probe


class TestDropBlockCallback:
    def test_injects_and_ramps_over_max_steps(self, whole_run) -> None:
        _, trainer, callback, probe = whole_run
        blocks = [m for m in trainer.model.modules() if isinstance(m, dbi.DropBlock)]
        assert blocks and callback.schedule is not None
        assert callback.schedule.total_steps == STEPS and callback.schedule.last_step == STEPS
        targets = [m.target_rate for m in blocks]
        assert [step for step, _ in probe.seen] == list(range(STEPS))
        for step, rates in probe.seen:
            assert rates == pytest.approx([t * step / STEPS for t in targets]), step
        assert callback.schedule.rates() == pytest.approx(targets)
        assert probe.dropped > 0  # DropBlock ran in train mode inside the Trainer's steps

    def test_logs_the_mean_rate_with_each_training_log(self, whole_run) -> None:
        _, trainer, callback, _ = whole_run
        logged = [(r["step"], r.get("dropblock/rate")) for r in trainer.state.log_history if "loss" in r]
        assert [step for step, _ in logged] == list(range(1, STEPS + 1))
        targets = [m.target_rate for m in callback.schedule.modules]
        for step, rate in logged:
            assert rate == pytest.approx(sum(targets) / len(targets) * step / STEPS), step

    def test_the_checkpoint_holds_the_schedule(self, whole_run) -> None:
        tmp_path, *_ = whole_run
        state = transformers.TrainerState.load_from_json(str(tmp_path / "checkpoint-3" / "trainer_state.json"))
        saved = state.stateful_callbacks["DropBlockCallback"]
        assert saved["attributes"]["saved_schedule"]["last_step"] == 3
        assert saved["attributes"]["saved_schedule"]["total_steps"] == STEPS
        assert saved["args"]["input_size"] == list(SIZE)

    def test_the_saved_weights_load_into_the_plain_model(self, whole_run, capfd) -> None:
        tmp_path, *_ = whole_run
        plain = transformers.ResNetForImageClassification.from_pretrained(str(tmp_path / "checkpoint-6"))
        assert not any(isinstance(m, dbi.DropBlock) for m in plain.modules())
        assert capfd.readouterr().err == ""  # no missing or unexpected keys reported

    def test_reporters_see_the_rate_when_the_callback_comes_first(self, tmp_path) -> None:
        class Reporter(transformers.TrainerCallback):  # as report_to integrations do: log what on_log gets
            def __init__(self) -> None:
                self.logged: list[dict] = []

            def on_log(self, args, state, control, logs=None, **kw) -> None:
                self.logged.append(dict(logs))

        reporter = Reporter()
        trainer = make_trainer(tmp_path, [reporter], max_steps=2)
        trainer.callback_handler.callbacks.insert(0, DropBlockCallback(input_size=SIZE))
        trainer.train()
        assert [round(r["dropblock/rate"], 4) for r in reporter.logged if "loss" in r] == [0.025, 0.05]

    def test_a_run_is_quiet(self, tmp_path, capfd) -> None:
        train(tmp_path, [DropBlockCallback(input_size=SIZE)], max_steps=2)
        assert capfd.readouterr().err == ""

    @pytest.mark.parametrize("restore", [False, True], ids=["resume", "restore-callback-states"])
    def test_resume_continues_the_saved_ramp(self, whole_run, tmp_path, restore, capfd) -> None:
        folder, _, _, whole = whole_run
        rates = dict(whole.seen)
        probe = RateProbe()
        # a longer resumed run: the saved ramp over 8 steps wins over this run's 12
        train(tmp_path, [DropBlockCallback(input_size=SIZE), probe], max_steps=12,
              resume=str(folder / "checkpoint-3"), restore_callback_states_from_checkpoint=restore,
              save_strategy="no")  # fmt: skip
        assert [step for step, _ in probe.seen] == list(range(3, 12))
        assert probe.seen[0][1] == pytest.approx(rates[3])  # the first resumed step: the uninterrupted run's rate
        final = rates[STEPS - 1][0] * STEPS / (STEPS - 1)
        for step, got in probe.seen:
            assert got[0] == pytest.approx(rates.get(step, [final])[0]), step
        assert capfd.readouterr().err == ""

    def test_resume_without_a_saved_schedule_follows_the_global_step(self, whole_run, tmp_path) -> None:
        folder, _, _, whole = whole_run
        checkpoint = tmp_path / "checkpoint-3"
        shutil.copytree(folder / "checkpoint-3", checkpoint)
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        del state["stateful_callbacks"]["DropBlockCallback"]  # a checkpoint of a run without the callback
        (checkpoint / "trainer_state.json").write_text(json.dumps(state))
        probe = RateProbe()
        train(tmp_path / "out", [DropBlockCallback(input_size=SIZE), probe], resume=str(checkpoint))
        assert [step for step, _ in probe.seen] == list(range(3, STEPS))
        for (step, got), (_, expected) in zip(probe.seen, whole.seen[3:]):
            assert got == pytest.approx(expected), step

    def test_a_rebuilt_callback_with_unsaved_arguments_says_what_to_do(self, tmp_path) -> None:
        callback = DropBlockCallback(example_inputs=torch.zeros(2, *SIZE))
        train(tmp_path / "first", [callback], max_steps=3)
        state = callback.state()
        assert state["attributes"]["unsaved_args"] == ["example_inputs"] and "example_inputs" not in state["args"]
        again = DropBlockCallback(example_inputs=torch.zeros(2, *SIZE))
        with pytest.raises(ValueError, match=r"\['example_inputs'\].*inject the model before"):
            train(tmp_path / "again", [again], resume=str(tmp_path / "first" / "checkpoint-3"),
                  restore_callback_states_from_checkpoint=True)  # fmt: skip

    def test_a_convnext_needs_no_argument(self, tmp_path) -> None:
        # the HF convnet most often fine-tuned: its family's recipe, at the config's image size
        config = transformers.ConvNextConfig(hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], num_labels=3,
                                             image_size=64)  # fmt: skip
        callback, probe = DropBlockCallback(), RateProbe()
        trainer = train(tmp_path, [callback, probe], max_steps=2, save_strategy="no",
                        model=transformers.ConvNextForImageClassification(config))  # fmt: skip
        hosts = [name for name, m in trainer.model.named_modules() if isinstance(m, dbi.DropBlock)]
        assert hosts and all(".pwconv1." in name for name in hosts)  # the convnext recipe: the MLP's fc1
        assert probe.seen[1][1] == pytest.approx([m.target_rate / 2 for m in callback.schedule.modules])
        assert probe.dropped > 0

    def test_takes_a_model_patched_before_the_trainer(self, tmp_path) -> None:
        model = dbi.inject(tiny_resnet(), input_size=SIZE, drop_prob=0.2)
        callback = DropBlockCallback()
        train(tmp_path, [callback], max_steps=2, model=model)
        assert callback.schedule is not None and callback.schedule.rates()[-1] == pytest.approx(0.2)

    def test_refuses_to_inject_again_into_a_patched_model(self, tmp_path) -> None:
        model = dbi.inject(tiny_resnet(), input_size=SIZE)
        with pytest.raises(ValueError, match="already holds DropBlocks"):
            train(tmp_path, [DropBlockCallback(drop_prob=0.2)], max_steps=2, model=model)
