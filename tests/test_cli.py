"""The command line: every command in a quick mode writes valid PNG/JSON outputs, and bad arguments fail clearly.

Commands run in-process (``adjointdeis.cli.main``) against the shipped digits model; one run goes through
``python -m adjointdeis`` to check the module entry point.
"""

import json
import pathlib
import shutil
import struct
import subprocess
import sys
import zlib

import pytest
import torch

from adjointdeis import cli, images
from adjointdeis._extension import cpu_name

pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")

COMMANDS = ["info", "demo", "sample", "guide", "bench", "accuracy", "diagnose"]
BYTES_PER_PIXEL = {0: 1, 2: 3, 4: 2, 6: 4}  # 8-bit greyscale, RGB, grey+alpha, RGBA


@pytest.fixture(autouse=True)
def keep_threads():
    """The CLI sets torch's thread count (default 1); restore it for the tests that follow."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def png_size(path: pathlib.Path) -> tuple[int, int]:
    """(width, height) of a valid 8-bit non-interlaced PNG: checks every chunk's CRC and the pixel data's length."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + body)
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert depth == 8 and interlace == 0 and colour in BYTES_PER_PIXEL
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(raw) == height * (1 + width * BYTES_PER_PIXEL[colour])
    return width, height


def run(capsys, *argv):
    """main(argv) in-process: (exit code, stdout, stderr)."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(capsys, command):
    code, out, _ = run(capsys, command, "--help")
    assert code == 0 and out.startswith(f"usage: adjointdeis {command}")


def test_module_entry_point_lists_the_commands():
    result = subprocess.run([sys.executable, "-m", "adjointdeis", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.skipif(shutil.which("adjointdeis") is None, reason="the console script is not installed")
def test_console_script():
    result = subprocess.run(["adjointdeis", "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("adjointdeis ")


def test_demo_quick_writes_pngs_and_prints_the_folder_last(tmp_path, capsys):
    out = tmp_path / "new" / "demo"
    code, stdout, _ = run(capsys, "demo", "--quick", "--out", str(out))
    assert code == 0
    lines = stdout.strip().splitlines()
    assert lines[0] == f"created folder {out}"
    assert lines[-1].endswith(str(out.resolve()))
    table = lines[lines.index(next(line for line in lines if line.startswith("solver"))):][:4]
    assert [row.split()[0] for row in table] == ["solver", "DDIM", "DEIS-3", "DPM++2M"]
    fds = [float(v) for row in table[1:] for v in row.split()[1::2]]
    assert len(fds) == 6 and all(0 <= v < 1000 for v in fds)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["morph-loss.png", "morph.png", "samples-ddim.png", "samples-deis-3.png", "samples-dpmpp2m.png"]
    for name in names:
        png_size(out / name)
    assert png_size(out / "samples-ddim.png") == (10 * 42 + 2, 5 * 42 + 2)  # 2 N x 2 rows + a blank, 40 px digits


def test_sample_writes_a_grid(tmp_path, capsys):
    out = tmp_path / "grids" / "grid.png"
    code, stdout, _ = run(capsys, "sample", "--solver", "dpmpp", "--order", "2", "--steps", "4", "--class", "3",
                          "--n", "9", "--out", str(out), "--seed", "1", "--sde", "--guidance", "2.0")
    assert code == 0
    assert png_size(out) == (3 * 34 + 2, 3 * 34 + 2)
    assert stdout.strip().splitlines()[-1] == f"wrote {out}"
    code, _, _ = run(capsys, "sample", "--solver", "deis", "--steps", "3", "--n", "12", "--out", str(out))
    assert code == 0 and png_size(out) == (10 * 34 + 2, 2 * 34 + 2)  # digits 0-9 in columns


def test_sample_with_the_dsno_student_is_one_evaluation(tmp_path, capsys):
    out = tmp_path / "dsno.png"
    code, stdout, _ = run(capsys, "sample", "--solver", "dsno", "--n", "20", "--out", str(out))
    assert code == 0
    assert "1 network evaluation" in stdout and png_size(out) == (10 * 34 + 2, 2 * 34 + 2)
    recognised = int(stdout.split("recognises ")[1].split("%")[0])
    assert recognised >= 70


@pytest.mark.parametrize("model", ["digits-flow", "digits-flow-reflow"])
def test_sample_from_the_flow_models(tmp_path, capsys, model):
    out = tmp_path / "flow.png"
    code, stdout, _ = run(capsys, "sample", "--model", model, "--solver", "heun", "--steps", "5", "--n", "20",
                          "--out", str(out))
    assert code == 0 and png_size(out) == (10 * 34 + 2, 2 * 34 + 2)
    summary = stdout.strip().splitlines()[-2]
    assert f"from {model}, heun-2, 5 steps = 9 model evaluations (uniform grid)" in summary
    recognised = int(summary.split("the classifier recognises ")[1].rstrip("%"))
    assert recognised >= 70, summary


@pytest.mark.parametrize("grad", ["discrete", "adjoint"])
def test_guide_writes_the_morph_and_its_loss_curve(tmp_path, capsys, grad):
    out = tmp_path / "morph.png"
    extra = ["--adjoint-order", "2", "--adjoint-steps", "4"] if grad == "adjoint" else []
    code, stdout, _ = run(capsys, "guide", "--from-index", "3", "--to-index", "7", "--iters", "3", "--steps", "4",
                          "--grad", grad, "--out", str(out), *extra)
    assert code == 0, stdout
    assert "loss" in stdout and "same-digit threshold" in stdout
    png_size(out)
    png_size(tmp_path / "morph-loss.png")


def test_loss_curve_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "have_matplotlib", lambda: False)
    path = images.save_line_plot(tmp_path / "curve.png", {"a": [3.0, 2.0, 1.5], "b": [1.0]})
    assert png_size(path) == (480, 320)


def test_bench_quick_writes_json_and_plot(tmp_path, capsys):
    json_path, plot_path = tmp_path / "bench.json", tmp_path / "plots" / "bench.png"
    code, stdout, _ = run(capsys, "bench", "--quick", "--json", str(json_path), "--plot", str(plot_path))
    assert code == 0
    result = json.loads(json_path.read_text())
    assert {row["section"] for row in result["rows"]} == {"kernel", "overhead", "gradients"}
    assert all(row["ours"] > 0 for row in result["rows"])
    assert result["meta"]["quick"] is True
    assert result["meta"]["cpu"] == cpu_name() and cpu_name() in stdout  # the table names its machine
    for row in result["rows"]:
        assert row["case"] in stdout
    png_size(plot_path)


def test_bench_plot_without_matplotlib_fails_before_running(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(images, "have_matplotlib", lambda: False)
    code, stdout, err = run(capsys, "bench", "--quick", "--plot", str(tmp_path / "b.png"))
    assert code == 2 and "pip install 'adjointdeis[plot]'" in err and stdout == ""


def test_diagnose_prints_the_table(capsys):
    code, stdout, _ = run(capsys, "diagnose", "--model", "digits", "--times", "50", "800", "--probes", "4",
                          "--points", "8", "--n", "8")
    assert code == 0
    rows = [line.split("|")[1:-1] for line in stdout.splitlines() if line.startswith("| ") and "±" in line]
    gaussian = "Gaussian fit (exact score)"
    assert [(row[0].strip(), float(row[1])) for row in rows] == [
        (gaussian, 50.0), ("digits", 50.0), (gaussian, 800.0), ("digits", 800.0)]
    for name, _, asym, circ in rows:
        asym, circ = (float(cell.split("±")[0]) for cell in (asym, circ))
        if name.strip().startswith("Gaussian"):  # zero up to float32 rounding
            assert asym < 1e-3 and circ < 1e-6
        else:
            assert asym > 1e-2 and circ > 1e-4
    assert "8 held-out digits" in stdout


def test_diagnose_refuses_more_digits_than_are_held_out():
    """zoo_table(n=...) took test_x[:n], so n = 500 silently measured the 297 held-out digits."""
    from adjointdeis.demo import zoo_table

    with pytest.raises(ValueError, match=r"n must be an integer in \[1, 297\]; got n=298"):
        zoo_table("digits", [50], n=298, probes=2, points=3)


@pytest.mark.parametrize("argv,message", [
    (["diagnose", "--probes", "1"], "--probes must be >= 2, got 1"),
    (["diagnose", "--points", "2"], "--points must be >= 3, got 2"),
    (["diagnose", "--radius", "0"], "--radius must be > 0, got 0.0"),
    (["diagnose", "--n", "298"], "--n must be at most 297, the number of held-out digits, got 298"),
    (["diagnose", "--model", "cifar"], "invalid choice: 'cifar'"),
    (["sample", "--solver", "euler"], "invalid choice: 'euler'"),
    (["sample", "--model", "faces"], "invalid choice: 'faces'"),
    (["sample", "--model", "digits-flow", "--solver", "dsno"], "distilled from digits, not from digits-flow"),
    (["diagnose", "--model", "digits-dsno"], "invalid choice: 'digits-dsno'"),
    (["sample", "--steps", "0"], "argument --steps: must be a positive integer, got 0"),
    (["sample", "--n", "many"], "argument --n: must be a positive integer, got 'many'"),
    (["sample", "--solver", "ddim", "--order", "2"], "solver 'ddim' supports order 1, got 2"),
    (["sample", "--solver", "deis", "--sde"], "sde=True is available for solver 'dpmpp'"),
    (["sample", "--class", "12"], "--class must be a digit 0-9, got 12"),
    (["sample", "--solver", "dsno", "--sde"], "--sde does not apply to --solver dsno"),
    (["sample", "--solver", "dsno", "--guidance", "2"], "--guidance does not apply to --solver dsno"),
    (["sample", "--solver", "dsno", "--steps", "3"], "--steps does not apply to --solver dsno"),
    (["sample", "--solver", "dsno", "--spacing", "karras"], "--spacing does not apply to --solver dsno"),
    (["sample", "--model", "digits-dsno", "--solver", "heun"], "not --solver heun"),
    (["sample", "--out", "grid.jpg"], "--out grid.jpg must be a .png file name"),
    (["guide", "--from-index", "297"], "--from-index 297 is out of range: there are 297 held-out digits, 0-296"),
    (["guide", "--to-index", "-1"], "--to-index -1 is out of range"),
    (["guide", "--grad", "autograd"], "invalid choice: 'autograd'"),
    (["guide", "--adjoint-steps", "5"], "--adjoint-steps applies to --grad adjoint"),
    (["guide", "--adjoint-form", "x0"], "--adjoint-form applies to --grad adjoint"),
    (["guide", "--lr", "0"], "--lr must be > 0, got 0.0"),
    (["guide", "--from-index", "400", "--out", "new/morph.png"], "--from-index 400 is out of range"),
    (["guide", "--iters", "0"], "argument --iters: must be a positive integer, got 0"),
    (["bench", "--json", "out.txt"], "--json out.txt must be a .json file name"),
    (["accuracy", "--steps", "10", "0"], "argument --steps: must be a positive integer, got 0"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["sample", "--seed", str(2**64)], f"argument --seed: must be an integer in [0, 2**64 - 1], got {2**64}"),
    (["demo", "--seed", "x"], "argument --seed: must be an integer, got 'x'"),
    (["diagnose", "--seed", str(-2**63 - 1)], "argument --seed: must be an integer in [0, 2**64 - 1]"),
])
def test_bad_arguments_fail_clearly(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, stdout, err = run(capsys, *argv)
    assert code == 2
    assert message in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_output_folder_refused_when_a_file_is_in_the_way(tmp_path, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("")
    code, _, err = run(capsys, "demo", "--quick", "--out", str(blocker))
    assert code == 2 and f"--out {blocker} exists and is not a folder" in err
    code, _, err = run(capsys, "sample", "--out", str(blocker / "grid.png"))
    assert code == 2 and f"{blocker} exists and is not a folder" in err
    folder = tmp_path / "looks-like.png"
    folder.mkdir()
    code, _, err = run(capsys, "guide", "--out", str(folder))
    assert code == 2 and f"--out {folder} is a folder" in err


def test_a_non_finite_sample_is_one_line_not_a_traceback(tmp_path, capsys):
    """A guidance scale whose samples overflow raised FloatingPointError out of main."""
    code, _, err = run(capsys, "sample", "--guidance", "1e308", "--n", "2", "--steps", "2",
                       "--out", str(tmp_path / "g.png"))
    assert code == 1 and err.startswith("adjointdeis sample: error: sample: the result is not finite")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "g.png").exists()


def test_seeds_span_what_the_generator_takes(tmp_path, capsys):
    for seed in ("-1", str(2**64 - 1)):
        code, _, err = run(capsys, "sample", "--seed", seed, "--n", "2", "--steps", "1", "--out", str(tmp_path / "s.png"))
        assert code == 0, err


def test_sde_noise_is_not_the_initial_noise(monkeypatch):
    """`adjointdeis sample --sde --seed S` drew x_T (class_noise) and the SDE noise (sample_digits) from two
    generators seeded alike, so the first injected noise was x_T itself; each must be independent of x_T."""
    from adjointdeis.demo import class_noise, load_kit, sample_digits

    kit = load_kit()
    x_T, labels = class_noise(kit, 64, 5)
    drawn, randn = [], torch.randn

    def spy(*args, **kwargs):
        out = randn(*args, **kwargs)
        if kwargs.get("generator") is not None:
            drawn.append(out.clone())
        return out

    monkeypatch.setattr(torch, "randn", spy)
    sample_digits(kit, x_T, labels, "dpmpp", 2, 4, seed=5, sde=True)
    monkeypatch.setattr(torch, "randn", randn)
    assert drawn and all(z.shape == x_T.shape for z in drawn)
    for z in drawn:   # 4096 pairs: |correlation| of independent normals is below 0.1 with overwhelming probability
        assert abs(torch.corrcoef(torch.stack([z.flatten(), x_T.flatten()]))[0, 1]) < 0.1
