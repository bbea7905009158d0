"""What a failing rank prints before it ends the job (train.main's last resort). It must
never raise itself: if it did, MPI_Abort would not run and the other ranks would wait."""
from hpcaccel.train import format_failure


def fails_deep():
    raise ValueError("bad value 42")


def test_failure_report_names_rank_and_error_then_the_traceback():
    try:
        fails_deep()
    except ValueError as e:
        report = format_failure(3, e)
    lines = report.splitlines()
    assert lines[0] == "hpcaccel: rank 3 failed: ValueError: bad value 42"
    assert lines[1] == "Traceback (most recent call last):"
    assert "in fails_deep" in report and lines[-1] == "ValueError: bad value 42"


def test_failure_report_of_an_exception_never_raised():
    report = format_failure(0, KeyboardInterrupt())
    assert report.splitlines() == ["hpcaccel: rank 0 failed: KeyboardInterrupt: ", "KeyboardInterrupt"]
