"""Which waiting ranks are stuck for good (waitgraph.py): only a set whose members each wait
for a member; a rank that computes, however slow, holds nobody up for good."""
from hpcaccel.waitgraph import Wait, cycle_from, describe, stuck


def counts(control=0, gradients=0):
    return {"control": control, "gradients": gradients}


def test_a_skipped_vote_is_two_ranks_each_waiting_for_the_other():
    # rank 0 skipped vote #5 and waits in bucket #3; rank 1 waits in vote #5
    waits = {0: Wait("gradients", 3, "bucket allreduce 0", counts(4, 3)),
             1: Wait("control", 5, "allreduce-max", counts(5, 2))}
    assert stuck(waits) == {0, 1}
    line = describe(0, waits, {0, 1})
    assert "rank 0 waits in gradients collective #3 (bucket allreduce 0), which rank 1 never entered" in line
    assert "rank 1 waits in control collective #5 (allreduce-max), which rank 0 never entered" in line


def test_a_rank_that_computes_holds_nobody_up_for_good():
    # ranks 0 and 1 wait in vote #5; rank 2 is still computing (it tells no wait)
    waits = {0: Wait("control", 5, "", counts(5)), 1: Wait("control", 5, "", counts(5))}
    assert stuck(waits) == set()
    # ... even when it is behind by many collectives
    waits[0] = Wait("gradients", 9, "", counts(5, 9))
    assert stuck(waits) == set()


def test_ranks_in_the_same_collective_are_not_stuck():
    waits = {r: Wait("control", 5, "", counts(5, 3)) for r in range(4)}
    assert stuck(waits) == set()


def test_a_rank_waiting_for_a_stuck_pair_is_stuck_and_says_whom_it_waits_for():
    waits = {0: Wait("gradients", 3, "", counts(4, 3)),
             1: Wait("control", 5, "", counts(5, 2)),
             2: Wait("control", 5, "", counts(5, 2))}   # waits for rank 0's vote too
    assert stuck(waits) == {0, 1, 2}
    assert cycle_from(2, waits, {0, 1, 2}) == [0, 1] or cycle_from(2, waits, {0, 1, 2}) == [0, 2]
    assert describe(2, waits, {0, 1, 2}).startswith("the ranks run different collectives: rank 2 waits for them;")


def test_only_the_stuck_part_fails_when_another_rank_computes():
    # 0 and 1 wait for each other; 2 waits in gradients #2, which 0 and 1 entered: it waits
    # only for rank 3, which computes (it tells no wait), so it can still go on
    waits = {0: Wait("gradients", 3, "", counts(4, 3)),
             1: Wait("control", 5, "", counts(5, 2)),
             2: Wait("gradients", 2, "", counts(6, 2))}
    assert stuck(waits) == {0, 1}
    # a rank that waits for the stuck pair is stuck too
    waits[2] = Wait("control", 6, "", counts(6, 3))
    assert stuck(waits) == {0, 1, 2}
    # ranks waiting only for a computing rank are not
    waits = {0: Wait("control", 5, "", counts(5, 3)), 1: Wait("control", 5, "", counts(5, 3))}
    assert stuck({**waits, 2: Wait("gradients", 4, "", counts(5, 4))}) == set()
