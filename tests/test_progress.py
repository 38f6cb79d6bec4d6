"""Training progress: plain lines every N steps for logs, the lr of every parameter group."""

import io

from vlm_tune.progress import LineProgress, lr_text, make_progress


def test_plain_lines_every_n_steps_and_at_the_last_one():
    stream = io.StringIO()
    progress = LineProgress(total=7, initial=0, every=3, enabled=True, stream=stream)
    for step in range(1, 8):
        progress.set_postfix(loss=f"{step:.4f}", lr="1.0e-04", tok_s="300")
        progress.update(1)
    lines = stream.getvalue().splitlines()
    assert [line.split(" |")[0] for line in lines] == ["step 3/7 (42%)", "step 6/7 (85%)", "step 7/7 (100%)"]
    assert "| loss 3.0000 (mean of steps 1-3) | lr 1.0e-04 | 300 tok/s |" in lines[0]
    assert "| loss 7.0000 |" in lines[2]  # one step since the previous line: no window to name
    assert "\r" not in stream.getvalue()


def test_other_processes_print_nothing_and_a_resumed_run_counts_from_its_step():
    quiet = io.StringIO()
    progress = LineProgress(total=4, initial=0, every=1, enabled=False, stream=quiet)
    progress.update(1)
    progress.write("eval loss 1.0")
    assert quiet.getvalue() == ""
    stream = io.StringIO()
    resumed = LineProgress(total=6, initial=4, every=2, enabled=True, stream=stream)
    resumed.set_postfix(loss="1.0000")
    resumed.update(1)
    resumed.update(1)
    assert stream.getvalue().startswith("step 6/6 (100%) | loss 1.0000 (mean of steps 5-6)")


def test_the_lr_of_each_group_is_shown_and_equal_ones_once():
    groups = [{"name": "vision", "lr": 2e-3}, {"name": "projector", "lr": 2e-3}, {"name": "language", "lr": 2e-4}]
    assert lr_text(groups) == "vision+projector 2.0e-03, language 2.0e-04"
    assert lr_text([{"name": "language", "lr": 1e-4}, {"name": "vision", "lr": 1e-4}]) == "1.0e-04"


def test_no_terminal_means_plain_lines():
    assert isinstance(make_progress(10, 0, 2, enabled=True, bar=False), LineProgress)
    assert isinstance(make_progress(10, 0, 2, enabled=True), LineProgress)  # pytest's stderr is not a terminal
    assert not isinstance(make_progress(10, 0, 2, enabled=True, bar=True), LineProgress)
