"""mach_lightning.export: raw inputs in, the recorded input spec, three file formats, latency."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mach_lightning import export
from mach_lightning.config import load_config
from mach_lightning.export_cost import accuracy, latency_ms
from mach_lightning.export_input import SAVED_STATE, input_constants
from mach_lightning.fit import run_fit

from .conftest import tiny_overrides
from .test_dni import SMALL

FORMATS = ("state_dict", "torchscript", "torch_export")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A two-epoch mach_seq run on digits (data.normalize is on by default)."""
    tmp = tmp_path_factory.mktemp("export_run")
    overrides = ["topology.name=mach_seq", "model.num_components=2", *SMALL]
    return Path(run_fit(load_config(None, tiny_overrides(tmp, *overrides)))["run_dir"])


@pytest.fixture(scope="module")
def trained(run):
    """(topology, its data module set up, the raw digits test split as the files hold it)."""
    torch.set_grad_enabled(False)  # as the export command runs; restored below
    model = export.load_topology(run / "checkpoints" / "last.ckpt")
    datamodule = export.run_data(model)
    raw = datamodule.dataset.load(datamodule.data_cfg)
    yield model, datamodule, raw
    torch.set_grad_enabled(True)


def prepared_test(datamodule) -> tuple[torch.Tensor, torch.Tensor]:
    """The test split as training evaluated it: scaled and standardised by the data module."""
    xs, ys = zip(*datamodule.test_dataloader())
    return torch.cat(xs), torch.cat(ys)


def export_main(run: Path, out: Path, *flags: str) -> int:
    ckpt = run / "checkpoints" / "last.ckpt"
    return export.main(["--ckpt", str(ckpt), "--out", str(out), *flags])


def test_the_default_export_takes_raw_digits_and_predicts_as_the_run_evaluated(
    run, trained, tmp_path, capsys
):
    model, datamodule, raw = trained
    out = tmp_path / "c0.pt"
    assert export_main(run, out) == 0
    report = capsys.readouterr().out
    loaded = export.load_standalone(out)
    x, y = prepared_test(datamodule)
    component = model.eval_logits(x)["c0"]  # the chain's component 0, on normalised inputs
    logits = loaded(raw.test_images)  # uint8 in [0, 16], exactly as the dataset holds them
    torch.testing.assert_close(logits, component)
    assert torch.equal(logits.argmax(-1), component.argmax(-1))
    acc = (component.argmax(-1) == y).float().mean().item()
    assert acc > 0.3  # trained well past chance (0.1), so equal predictions mean something
    assert (logits.argmax(-1) == raw.test_labels).float().mean().item() == acc
    result = json.loads((run / "result.json").read_text())
    assert acc == pytest.approx(result["test/acc_c0"], abs=1e-6)  # what the run itself measured
    standalone_row = next(line for line in report.splitlines() if line.startswith("standalone"))
    assert f"{acc:.4f}" in standalone_row  # the report measured the file, fed raw inputs


def test_no_normalize_exports_the_component_alone_which_raw_inputs_would_mislead(
    run, trained, tmp_path
):
    model, datamodule, raw = trained
    out = tmp_path / "c0_prepared.pt"
    assert export_main(run, out, "--no-normalize") == 0
    loaded = export.load_standalone(out)
    x, _ = prepared_test(datamodule)
    torch.testing.assert_close(loaded(x), model.eval_logits(x)["c0"])
    wrong = loaded(raw.test_images.float()).argmax(-1)
    assert not torch.equal(wrong, model.eval_logits(x)["c0"].argmax(-1))  # why the layer exists
    assert loaded.input_spec["raw"] is False and loaded.input_spec["dtype"] == "float32"


def test_the_recorded_input_spec_is_the_one_the_run_applied(trained, tmp_path):
    model, datamodule, _ = trained
    exported = export.export_component(model, 0, tmp_path / "c0.pt")
    spec = export.load_standalone(tmp_path / "c0.pt").input_spec
    assert spec == exported.input_spec
    assert spec["raw"] is True and spec["dataset"] == "digits"
    assert spec["shape"] == ["N", 1, 8, 8] and spec["dtype"] == "uint8"
    assert spec["range"] == [0, 16] and spec["max_value"] == 16
    assert "uint8" in spec["expects"] and "[0, 16]" in spec["expects"]
    # Undoing the recorded standardisation on the run's own training inputs gives back the
    # dataset's values, whole multiples of 1/16 in [0, 1]: these are the constants it used.
    train = torch.cat([x for x, _ in datamodule.train_dataloader()])
    mean, std = torch.tensor(spec["mean"]), torch.tensor(spec["std"])
    values = (train * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)) * 16
    torch.testing.assert_close(values, values.round(), atol=1e-4, rtol=0)
    assert values.min() > -0.01 and values.max() < 16.01
    assert "seed 0" in spec["constants_source"]


def test_a_run_without_normalisation_exports_only_the_scaling(tiny_cfg, trained, tmp_path):
    *_, raw = trained
    cfg = tiny_cfg("topology.name=mach_seq", "model.num_components=2", "data.normalize=false")
    model = export.build_topology(OmegaConf.to_container(cfg), (1, 8, 8), 10).eval()
    exported = export.export_component(model, 0, tmp_path / "c0.pt")
    assert exported.input_spec["mean"] is None and exported.input_spec["std"] is None
    images = raw.test_images[:32]
    expected = model.standalone_model(0)(images.float() / 16)
    torch.testing.assert_close(export.load_standalone(tmp_path / "c0.pt")(images), expected)


def test_constants_saved_in_the_checkpoint_win_over_recomputing(trained):
    _, datamodule, _ = trained
    saved = {"max_value": 255, "channel_mean": torch.tensor([0.5]), "channel_std": [0.25]}
    constants = input_constants({SAVED_STATE: saved}, datamodule)
    assert (constants.max_value, constants.mean, constants.std) == (255.0, [0.5], [0.25])
    assert constants.source == "saved in the checkpoint"
    recomputed = input_constants({}, datamodule)
    assert recomputed.mean == datamodule.channel_mean.tolist()


def test_a_file_from_before_the_input_layer_still_loads_as_it_was(trained, tmp_path):
    model, datamodule, _ = trained
    export.export_component(model, 0, tmp_path / "c0.pt")
    record = torch.load(tmp_path / "c0.pt", weights_only=True)
    del record["input"]  # what mach_lightning.standalone/1 wrote
    torch.save({**record, "format": export.LEGACY_FORMAT}, tmp_path / "old.pt")
    old = export.load_standalone(tmp_path / "old.pt")
    assert old.input_spec["raw"] is False  # a bare component, expecting prepared inputs
    x, _ = prepared_test(datamodule)
    torch.testing.assert_close(old(x), model.eval_logits(x)["c0"])


def load_with_torch(fmt: str, path: Path):
    """The file read back by torch's own loader for its format, without mach_lightning."""
    if fmt == "torchscript":
        return torch.jit.load(str(path))
    if fmt == "torch_export":
        with open(path, "rb") as file:
            return torch.export.load(file).module()
    return export.load_standalone(path)  # torch.load(weights_only=True), then the architecture


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_loads_back_and_gives_the_same_outputs(fmt, trained, tmp_path):
    model, _, raw = trained
    path = tmp_path / f"c0.{fmt}"
    in_memory = export.export_component(model, 0, path, fmt=fmt)
    for batch in (raw.test_images, raw.test_images[:1]):  # the batch size is not baked in
        expected = in_memory(batch)
        torch.testing.assert_close(load_with_torch(fmt, path)(batch), expected)
        torch.testing.assert_close(export.load_standalone(path)(batch), expected)
    assert export.load_standalone(path).input_spec == in_memory.input_spec


def test_the_format_flag_writes_a_torch_export_file(run, trained, tmp_path, capsys):
    model, datamodule, raw = trained
    out = tmp_path / "c0.pt2"
    assert export_main(run, out, "--format", "torch_export", "--component", "1") == 0
    assert "(torch_export)" in capsys.readouterr().out
    x, _ = prepared_test(datamodule)
    with open(out, "rb") as file:
        program = torch.export.load(file).module()
    torch.testing.assert_close(program(raw.test_images), model.eval_logits(x)["c1"])


def test_a_bad_format_or_component_is_refused(run, tmp_path, capsys):
    with pytest.raises(SystemExit):
        export_main(run, tmp_path / "c0.pt", "--format", "onnx")
    assert export_main(run, tmp_path / "c0.pt", "--component", "5") == 2
    assert "components 0..1" in capsys.readouterr().err
    assert not (tmp_path / "c0.pt").exists()


def test_the_cost_report_shows_median_and_iqr_and_the_student_is_cheaper(trained, tmp_path):
    model, datamodule, _ = trained
    export.export_component(model, 0, tmp_path / "c0.pt")
    loaded = export.load_standalone(tmp_path / "c0.pt")
    results = export.compare(model, 0, exported=loaded, datamodule=datamodule, min_run_time=0.1)
    assert results["standalone"]["params"] < results["full chain"]["params"]
    assert results["standalone"]["flops"] < results["full chain"]["flops"]
    x, y = prepared_test(datamodule)
    assert results["standalone"]["test_acc"] == accuracy(model.standalone_model(0), [(x, y)])
    in_memory = export.compare(model, 0, datamodule=datamodule, min_run_time=0.05)
    assert in_memory["standalone"]["test_acc"] == results["standalone"]["test_acc"]
    report = export.format_report(results, threads=1)
    assert "median ± IQR" in report and "1 thread(s)" in report
    assert f"batch {min(len(y), datamodule.data_cfg.eval_batch_size)}" in report  # as timed
    rows = [line for line in report.splitlines() if line.startswith(("standalone", "full chain"))]
    assert len(rows) == 2 and all(row.count("±") == 2 for row in rows)


def test_latency_gives_a_median_and_spread_and_runs_on_the_threads_asked_for(trained):
    """How repeatable the figure is depends on the machine's load: bench/, not a unit test,
    judges that (a 2x bound here failed under CI's load)."""
    model, datamodule, _ = trained
    network = model.standalone_model(0)
    x, _ = prepared_test(datamodule)
    median, iqr = latency_ms(network, x)
    assert math.isfinite(median) and median > 0 and math.isfinite(iqr) and iqr >= 0

    seen: list[int] = []

    def records_threads(batch):
        seen.append(torch.get_num_threads())
        return network(batch)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        latency_ms(records_threads, x[:1], threads=1, min_run_time=0.01)
        assert seen and set(seen) == {1}  # fixed during the measurement...
        assert torch.get_num_threads() == 2  # ...and given back after it
    finally:
        torch.set_num_threads(before)
