"""The scheduler and the session store on their own: which sequences run, what holds
KV blocks, when a session's KV is kept. Steps are played by hand (each scheduled token
is taken as computed, each finished prompt gets one more token): no model runs."""

from __future__ import annotations

import time

from tokenguard.runner.engine.block_manager import BlockManager
from tokenguard.runner.engine.scheduler import Scheduler
from tokenguard.runner.engine.sequence import Sequence
from tokenguard.runner.engine.sessions import SessionStore
from tokenguard.runner.sampling import SamplingParams


def sequence(tokens, session=None) -> Sequence:
    return Sequence(len(tokens), list(tokens), SamplingParams(max_tokens=100), frozenset(), lambda event: None,
                    session=session)


def step(scheduler: Scheduler) -> list[tuple[Sequence, int]]:
    """One engine step without the model: the scheduled tokens are computed, and a
    sequence whose tokens are all computed generates one more."""
    batch = scheduler.schedule()
    for seq, n in batch:
        seq.num_cached += n
        if seq.num_cached == len(seq.tokens):
            seq.tokens.append(7)
    return batch


def pool(num_blocks: int = 8, block_size: int = 4) -> tuple[BlockManager, SessionStore, Scheduler]:
    blocks, sessions = BlockManager(num_blocks, block_size), SessionStore(ttl_s=60)
    return blocks, sessions, Scheduler(blocks, sessions, lambda source, target, slots: None, max_batched_tokens=64)


def keep_session(scheduler: Scheduler, session: str, tokens) -> None:
    turn = sequence(tokens, session)
    scheduler.add(turn)
    step(scheduler)
    scheduler.finish(turn, keep_session=True)


def test_a_waiting_session_turn_holds_no_blocks_a_preempted_sequence_needs():
    # The turn took its session's KV while it waited; the sequence preempted in front of
    # it then could never get enough blocks: every step was empty, both waited forever.
    blocks, _, scheduler = pool()
    keep_session(scheduler, "s", range(12))  # 3 of the 8 blocks kept for session "s"
    running = sequence(range(100, 116))
    scheduler.add(running)
    step(scheduler)
    turn = sequence([*range(12), *range(200, 210)], "s")  # starts on the session's 3 blocks
    scheduler.add(turn)
    for _ in range(40):
        batch = step(scheduler)
        assert batch or not scheduler.has_work(), "a step scheduled nothing while requests waited"
        for seq in list(scheduler.running):
            if seq.num_generated >= 8:
                scheduler.finish(seq, keep_session=False)
        if not scheduler.has_work():
            break
    assert not scheduler.has_work() and blocks.num_free == blocks.num_blocks


def test_a_session_ended_while_its_turn_runs_keeps_no_kv():
    blocks, sessions, scheduler = pool()
    turn = sequence(range(10), "s")
    scheduler.add(turn)
    step(scheduler)
    blocks.release(sessions.end("s"))  # as Engine.end_session does, mid-turn
    scheduler.finish(turn, keep_session=True)
    assert len(sessions) == 0 and blocks.num_free == blocks.num_blocks


def test_a_preempted_turn_does_not_count_the_kv_it_gave_up_as_reused():
    _, _, scheduler = pool(num_blocks=6)
    keep_session(scheduler, "s", range(8))
    turn = sequence([*range(8), *range(50, 54)], "s")
    scheduler.add(turn)
    step(scheduler)
    assert turn.cached_prompt_tokens == scheduler.prefix_tokens_reused == 8
    scheduler._preempt(turn)  # memory pressure: its prompt is computed again
    assert turn.cached_prompt_tokens == scheduler.prefix_tokens_reused == 0


def test_a_session_past_its_ttl_is_not_touched_back_to_life():
    sessions = SessionStore(ttl_s=0.05)
    sessions.open("s")
    assert sessions.touch("s")
    time.sleep(0.1)  # the engine, busy, has not dropped it yet
    assert not sessions.touch("s") and not sessions.is_live("s")
