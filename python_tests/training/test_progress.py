"""Progress: a bar on a terminal, a line every few percent elsewhere (CI, log files)."""
import io

import torch

from landscape_kernels.training.models import mlp
from landscape_kernels.training.progress import Progress
from landscape_kernels.training.trainer import SGDTrainer


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_gets_a_line_every_five_percent_and_no_carriage_returns():
    log = io.StringIO()
    with Progress(1000, desc="SGD", unit="epoch", stream=log) as p:
        for i in range(1000):
            p.update(1, loss=f"{1 / (i + 1):.3g}")
    lines = log.getvalue().splitlines()
    assert len(lines) == 20 and "\r" not in log.getvalue()
    assert lines[0].startswith("SGD: 50/1000 epochs (5 %)") and lines[-1].startswith("SGD: 1000/1000 epochs (100 %)")
    assert lines[-1].endswith("loss 0.001")


def test_a_resumed_or_interrupted_run_reports_where_it_stands():
    log = io.StringIO()
    with Progress(1000, initial=990, desc="SGD", unit="epoch", stream=log) as p:
        for _ in range(3):
            p.update(1)
    (line,) = log.getvalue().splitlines()  # the 5 % step is not reached: one line, at the end
    assert line.startswith("SGD: 993/1000 epochs (99 %)")
    silent = io.StringIO()
    Progress(10, stream=silent).close()  # nothing done: nothing to say
    assert silent.getvalue() == ""


def test_a_terminal_gets_a_bar():
    tty = Terminal()
    with Progress(50, desc="SGD", unit="epoch", stream=tty) as p:
        for _ in range(50):
            p.update(1, loss="0.1")
    assert "\r" in tty.getvalue() and "50/50" in tty.getvalue()


def test_training_with_progress_writes_lines_to_a_log(capsys):
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    SGDTrainer(mlp((5, 4, 3), seed=0), x, y, batch_size=10).run(max_epochs=40, stopping_rule=None, progress=True)
    err = capsys.readouterr().err  # pytest's captured stderr is not a terminal
    assert err.count("\n") == 20 and "\r" not in err and "SGD: 40/40 epochs (100 %)" in err
