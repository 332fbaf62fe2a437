"""data.mix: examples drawn from several sources by weight (proportions within tolerance,
reproducible by seed, each source with its own format), reported per source in the run-start line
and run_start telemetry; resuming inside a mixture (about a second on the tiny model) reproduces the uninterrupted run exactly."""

import json

import pytest
import torch

from swengine.config import DataConfig, DataSource, load_config
from swengine.data.dataset import prepare
from swengine.errors import UserError
from swengine.model.load import DEMO_MODEL, DEMO_TRAIN, load_tokenizer
from swengine.telemetry.logger import read_events
from tests.utils import run_main


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(DEMO_MODEL))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    text = root / "text.jsonl"
    text.write_text("".join(json.dumps({"body": f"the cat {i} sees the dog"}) + "\n" for i in range(300)))
    alpaca = root / "alpaca.jsonl"
    alpaca.write_text("".join(json.dumps({"instruction": f"Reverse: a{i} b", "output": f"b a{i}"}) + "\n"
                              for i in range(100)))
    return text, alpaca


def mix_cfg(sources, w_text=0.7, w_alpaca=0.3, **kw) -> DataConfig:
    text, alpaca = sources
    return DataConfig(mix=[DataSource(str(text), w_text, "text", "body"), DataSource(str(alpaca), w_alpaca)],
                      **{"max_seq_len": 64, "eval_fraction": 0.0, "packing": False, **kw})


def drawn(prep) -> dict[str, int]:
    return {name.rsplit("/", 1)[-1]: n for name, n in prep.mix}


def test_proportions_follow_the_weights_and_the_seed(sources, tok):
    prep = prepare(mix_cfg(sources), tok, "", "", 0)
    counts = drawn(prep)
    total = sum(counts.values())
    assert total == 400 == len(prep.train) and prep.format == "text+alpaca"
    assert abs(counts["text.jsonl"] / total - 0.7) < 0.06  # 400 draws: 3 standard deviations is ~0.07
    flipped = drawn(prepare(mix_cfg(sources, 0.1, 0.9), tok, "", "", 0))
    assert abs(flipped["alpaca.jsonl"] / total - 0.9) < 0.05  # alpaca is drawn ~3.6x over: sampled again
    ids = [r.input_ids for r in prep.train]
    assert ids == [r.input_ids for r in prepare(mix_cfg(sources), tok, "", "", 0).train]
    assert ids != [r.input_ids for r in prepare(mix_cfg(sources), tok, "", "", 1).train]
    assert prep.mix_summary.startswith("mix ") and f"text.jsonl {counts['text.jsonl']} (" in prep.mix_summary


def test_each_source_keeps_its_own_format(sources, tok):
    prep = prepare(mix_cfg(sources), tok, "", "", 0)
    decoded = [tok.decode(r.input_ids) for r in prep.train]
    assert any("the cat" in d for d in decoded) and any("Reverse:" in d for d in decoded)
    masked = [r for r in prep.train if any(lab == -100 for lab in r.labels)]
    assert masked and all("Reverse:" in tok.decode(r.input_ids) for r in masked)  # alpaca masks its prompt


def test_mix_errors_are_one_line(sources, tok):
    text, _ = sources
    with pytest.raises(UserError, match="data.train and data.mix are both set"):
        prepare(DataConfig(train=str(text), mix=[DataSource(str(text))]), tok, str(text), "", 0)
    with pytest.raises(UserError, match=r"data.mix\[1\] needs a path and a weight > 0"):
        prepare(DataConfig(mix=[DataSource(str(text)), DataSource(str(text), 0.0)]), tok, "", "", 0)
    with pytest.raises(UserError, match=r"data.mix\[0\].weight must be a number"):
        load_config(None, ['data.mix=[{"path": "a.jsonl", "weight": "heavy"}]'])
    with pytest.raises(UserError, match=r"unknown config key data.mix\[0\].wieght"):
        load_config(None, ['data.mix=[{"path": "a.jsonl", "wieght": 1}]'])


def test_the_cli_reports_each_source_in_the_run_start_line_and_telemetry(sources, tiny_llama, tmp_path, capsys):
    torch.set_num_threads(1)
    text, alpaca = sources
    mix = json.dumps([{"path": str(text), "weight": 0.5, "text_field": "body"}, {"path": str(alpaca), "weight": 0.5}])
    argv = ["train", f"model.path={tiny_llama}", f"data.mix={mix}", "schedule.max_steps=1", "data.max_seq_len=64",
            "schedule.micro_batch_size=2", "logging.eval_every=0", f"data.cache_dir={tmp_path / 'cache'}"]
    code, _, err = run_main(capsys, [*argv, f"output_dir={tmp_path / 'a'}"])
    assert code == 0, err
    assert "mix " in err and "text.jsonl" in err and "alpaca.jsonl" in err and "(cached)" in err
    (start,) = read_events(tmp_path / "a" / "metrics.jsonl", "run_start")
    assert sum(start["data_mix"].values()) == 380 and len(start["data_mix"]) == 2  # 5% of each held out for eval
    code, _, err = run_main(capsys, [*argv, f"output_dir={tmp_path / 'b'}"])
    assert code == 0 and "tokenised: cache hit" in err


def test_resume_inside_a_mixture_reproduces_the_uninterrupted_run(sources, tiny_llama, tmp_path, capsys,
                                                                  monkeypatch):
    import swengine.train.trainer as trainer

    torch.set_num_threads(1)
    text, _ = sources
    demo = tmp_path / "demo.jsonl"
    demo.write_text("\n".join(DEMO_TRAIN.read_text().splitlines()[:50]) + "\n")
    mix = json.dumps([{"path": str(text), "weight": 0.4, "text_field": "body"}, {"path": str(demo), "weight": 0.6}])

    def argv(out, *extra):
        return ["train", f"model.path={tiny_llama}", f"data.mix={mix}", "schedule.max_steps=6", "data.max_seq_len=64",
                "schedule.micro_batch_size=2", "schedule.grad_accumulation=2", "logging.every=1",
                "logging.eval_every=0", "checkpointing.save_every=2", "optim.lr=3e-3", "lora.dropout=0.1",
                f"output_dir={out}", *extra]

    code, _, err = run_main(capsys, argv(tmp_path / "reference"))
    assert code == 0, err
    expected = {e["step"]: e["loss"] for e in read_events(tmp_path / "reference" / "metrics.jsonl", "train")}
    real, calls = trainer.forward_backward, [0]

    def interrupt(*a, **k):
        calls[0] += 1
        if calls[0] == 8:  # micro-batch 2 of step 4: after the step-2 checkpoint
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(trainer, "forward_backward", interrupt)
    code, _, err = run_main(capsys, argv(tmp_path / "run"))
    assert code == 130, err
    monkeypatch.setattr(trainer, "forward_backward", real)
    code, _, err = run_main(capsys, [*argv(tmp_path / "run"), "--resume", "auto"])
    assert code == 0 and "resumed from" in err, err
    losses = {e["step"]: e["loss"] for e in read_events(tmp_path / "run" / "metrics.jsonl", "train")}
    assert len(expected) == 6 and losses == expected


def test_a_mix_source_can_be_a_saved_dataset_with_its_own_split(sources, tok, tmp_path):
    datasets = pytest.importorskip("datasets")
    text, _ = sources
    rows = [{"prompt": f"Say {i}", "completion": f"{i} said"} for i in range(50)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:10]), "test": datasets.Dataset.from_list(rows)}
                         ).save_to_disk(str(tmp_path / "saved"))
    cfg = DataConfig(mix=[DataSource(str(text), 1.0, "text", "body"), DataSource(str(tmp_path / "saved"), 1.0,
                                                                               split="test")],
                     max_seq_len=64, eval_fraction=0.0, packing=False)
    prep = prepare(cfg, tok, "", "", 0)
    assert prep.format == "text+prompt_completion" and prep.train_examples == 350
    assert [name.endswith("saved (test)") for name, _ in prep.mix] == [False, True]
    assert abs(prep.mix[1][1] / 350 - 0.5) < 0.1  # equal weights, whatever the sizes (300 vs 50)
