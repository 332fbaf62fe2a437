"""Distillation in the training loop (issue 17), end to end through the CLI on CPU: the demo model
as the teacher, a smaller random student with the same tokenizer; online and offline (cache)."""

import json
from pathlib import Path

import jsonschema
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import swkernels
from swengine.cli import main
from swengine.model.load import DEMO_MODEL, load_tokenizer
from swengine.telemetry import read_events
from tests.utils import pretrain, run_main

ROOT = Path(__file__).parents[1]
STEPS = 60


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add overhead
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def student(tmp_path_factory, tiny_train_data):
    """Smaller than the teacher (hidden 32, 2 layers), its head padded to 512 rows (vocab 508),
    pre-trained with 60 full-parameter Adam steps on the data so that LoRA has something to adapt."""
    from swengine.config import DataConfig
    from swengine.data.dataset import prepare

    tok = load_tokenizer(str(DEMO_MODEL))
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=256, vocab_size=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    rows = prepare(DataConfig(max_seq_len=64, eval_fraction=0.0), tok, str(tiny_train_data), "", 0).train
    pretrain(model, rows, tok.pad_token_id)
    path = tmp_path_factory.mktemp("student") / "student"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run(capsys, argv):
    return run_main(capsys, argv)


def train_args(student, data, out, *extra):
    return ["train", f"model.path={student}", f"data.train={data}", f"output_dir={out}", f"schedule.max_steps={STEPS}",
            "schedule.micro_batch_size=4", "data.max_seq_len=64", "optim.lr=2e-2", "schedule.warmup_steps=2",
            "logging.every=4", "logging.eval_every=0", "checkpointing.save_every=0", "lora.rank=8", "lora.alpha=16",
            *extra]


def kl_to_teacher(student, run_dir, data) -> float:
    """Mean KL(teacher ‖ student) per label token on the training rows, with full logits."""
    from peft import PeftModel

    from swengine.config import DataConfig
    from swengine.data.batches import eval_batches
    from swengine.data.dataset import prepare

    tok = load_tokenizer(str(student))
    rows = prepare(DataConfig(max_seq_len=64, eval_fraction=0.0), tok, str(data), "", 0).train[:16]
    teacher = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in eval_batches(rows, 8, tok.pad_token_id):
            mask = batch["labels"][:, 1:] != -100
            p = torch.log_softmax(teacher(input_ids=batch["input_ids"]).logits[:, :-1, :508], -1)
            q = torch.log_softmax(model(input_ids=batch["input_ids"]).logits[:, :-1, :508], -1)
            kl = (p.exp() * (p - q)).sum(-1)
            total += float(kl[mask].sum())
            count += int(mask.sum())
    return total / count


@pytest.fixture(scope="module")
def runs(student, tiny_train_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    out = {}
    for name, extra in (("sft", []), ("online", ["--teacher", str(DEMO_MODEL), "distill.alpha=1.0"])):
        with swkernels.force_backend("torch"), pytest.raises(SystemExit) as exit_:
            main(train_args(student, tiny_train_data, root / name, *extra))
        assert exit_.value.code == 0, name
        out[name] = root / name
    return out


def test_distillation_brings_the_student_closer_to_the_teacher_than_sft(runs, student, tiny_train_data):
    sft, online = kl_to_teacher(student, runs["sft"], tiny_train_data), kl_to_teacher(student, runs["online"],
                                                                                        tiny_train_data)
    print(f"KL(teacher || student): distilled {online:.3f}, SFT {sft:.3f}")
    assert online < 0.9 * sft, (online, sft)


def test_telemetry_reports_the_ce_and_kd_parts(runs):
    schema = json.loads((ROOT / "specs" / "telemetry.schema.json").read_text())
    events = [json.loads(x) for x in (runs["online"] / "metrics.jsonl").read_text().splitlines()]
    for event in events:
        jsonschema.validate(event, schema)
    train = [e for e in events if e["event"] == "train"]
    assert len(train) == STEPS // 4
    for e in train:  # alpha = 1: the loss is all KD (the event's loss is the mean over its 4 steps)
        assert e["kd_loss"] > 0 and e["ce_loss"] == 0
    start = next(e for e in events if e["event"] == "run_start")
    assert start["config"]["distill"]["teacher"] == str(DEMO_MODEL)


def test_offline_cache_at_full_vocabulary_gives_the_online_loss(student, tiny_train_data, tmp_path, capsys):
    cache = tmp_path / "cache"
    common = [f"model.path={student}", f"data.train={tiny_train_data}", "data.max_seq_len=64"]
    code, _, err = run(capsys, ["distill-cache", *common, "--teacher", str(DEMO_MODEL), "--top-k", "508",
                                "--logprobs-dtype", "fp32", "--out", str(cache), "--tokenizer", str(student)])
    assert code == 0, err
    losses = {}
    for name, extra in (("online", ["--teacher", str(DEMO_MODEL)]), ("offline", [f"distill.cache={cache}"])):
        code, out, err = run(capsys, train_args(student, tiny_train_data, tmp_path / name, "schedule.max_steps=4",
                                                "logging.every=1", *extra))
        assert code == 0, err
        events = read_events(tmp_path / name / "metrics.jsonl", "train")
        losses[name] = [e["loss"] for e in events]
        for e in events:  # alpha = 0.5: loss = (CE + KD) / 2
            assert e["ce_loss"] > 0 and e["kd_loss"] > 0
            assert e["loss"] == pytest.approx(0.5 * (e["ce_loss"] + e["kd_loss"]), rel=1e-4)
        assert "(ce " in err and ", kd " in err  # the progress line shows both parts
    assert losses["offline"] == pytest.approx(losses["online"], rel=1e-4)

    code, _, err = run(capsys, train_args(student, ROOT / "swengine/assets/demo_data/reverse_eval.jsonl",
                                          tmp_path / "other", f"distill.cache={cache}"))
    assert code == 2 and "distill.cache" in err and "Traceback" not in err, err


@pytest.mark.parametrize("extra,needle", [
    (["--teacher", "x", "distill.cache=y"], "not both"),
    (["distill.cache=y", "context.phases=[32, 64]", "context.rope_scaling={\"rope_type\": \"yarn\", \"factor\": 2}"],
     "context.phases"),
    (["--teacher", str(DEMO_MODEL), "distill.alpha=1.5"], "distill.alpha must be in [0, 1]"),
    (["--teacher", str(DEMO_MODEL), "fused_loss=false"], "always uses the fused linear loss"),
    (["--teacher", "/nonexistent/teacher"], "/nonexistent/teacher"),
])
def test_bad_distillation_input_is_one_line_exit_2(student, tiny_train_data, tmp_path, capsys, extra, needle):
    code, _, err = run(capsys, train_args(student, tiny_train_data, tmp_path / "run", *extra))
    assert code == 2 and needle in err and "Traceback" not in err, err


def test_offline_cache_for_a_directory_and_a_mixture(student, tiny_train_data, tmp_path, capsys):
    """distill-cache identifies every source kind by content: a directory of files and a data.mix
    build and are accepted by the run on the same data; other mixture weights are refused."""
    folder = tmp_path / "data"
    folder.mkdir()
    lines = tiny_train_data.read_text().splitlines(keepends=True)
    (folder / "a.jsonl").write_text("".join(lines[:30]))
    (folder / "b.jsonl").write_text("".join(lines[30:]))
    a, b = folder / "a.jsonl", folder / "b.jsonl"
    mix = f'data.mix=[{{"path": "{a}", "weight": 0.7}}, {{"path": "{b}", "weight": 0.3}}]'
    for name, data_args in (("dir", [f"data.train={folder}"]), ("mix", [mix])):
        cache = tmp_path / f"cache-{name}"
        common = [f"model.path={student}", *data_args, "data.max_seq_len=64"]
        code, _, err = run(capsys, ["distill-cache", *common, "--teacher", str(DEMO_MODEL), "--top-k", "8",
                                    "--out", str(cache), "--tokenizer", str(student)])
        assert code == 0, err
        args = train_args(student, "", tmp_path / f"run-{name}", "schedule.max_steps=2", f"distill.cache={cache}")
        args = [a for a in args if not a.startswith("data.train=")] + data_args
        code, _, err = run(capsys, args)
        assert code == 0, err
    other = mix.replace("0.7", "0.5")
    args = [a for a in train_args(student, "", tmp_path / "run-other", f"distill.cache={tmp_path / 'cache-mix'}")
            if not a.startswith("data.train=")] + [other]
    code, _, err = run(capsys, args)
    assert code == 2 and "distill.cache" in err and "Traceback" not in err, err
