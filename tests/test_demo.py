"""README command 1: `tltoolkit demo` writes the digits set and runs the quickstart recipe on it."""

from tltoolkit.cli import main


def test_demo_writes_digits_and_runs_quickstart(tmp_path, capsys):
    out = tmp_path / "digits"
    code = main(
        [
            "demo",
            "--out",
            str(out),
            "--set",
            "stages.0.epochs=1",
            "--set",
            "stages.1.epochs=1",
            "--set",
            "data.image_size=32",
            "--set",
            "tracking.log_model=false",
        ]
    )
    assert code == 0
    train = sorted(p.name for p in (out / "labeled" / "train").iterdir())
    assert train == [str(d) for d in range(10)]
    counts = {part: sum(1 for _ in (out / part).rglob("*.png")) for part in ("labeled", "unlabeled")}
    assert counts == {"labeled": 1257, "unlabeled": 540}, "1797 digits: 70% labelled, 30% kept back unlabelled"
    printed = capsys.readouterr().out
    assert "test_accuracy" in printed and "tltoolkit ui" in printed
