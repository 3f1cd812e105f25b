"""The engine loop's messages, in process: a step's events go out before its finished sequences are released, and
the counters that follow show those blocks free."""
import threading

from arpo.engine import SamplingParams
from arpo.serve.engine_loop import EngineLoop, Job
from arpo.serve.server import load_parts

from serve_helpers import config, make_checkpoint


def test_finished_choices_are_sent_then_released(tmp_path):
    engine, _ = load_parts(make_checkpoint(str(tmp_path)), config(), max_seqs=4)
    sent = []
    loop = EngineLoop(engine, None, sent.append)
    total = engine.block_manager.num_blocks
    job = Job([1, 5, 6, 7], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), n=2, id=0)
    loop.put(("add", job))
    done = threading.Event()

    def stop_when_finished(msg):
        sent.append(msg)
        finishes = [e for m in sent for _, evs in m[1] for e in evs if e[0] == "finish"]
        if len(finishes) == 2 and msg[2]["free_blocks"] == total:
            done.set()
            loop.put(("stop", "test over"))

    loop.send = stop_when_finished
    loop.run()
    assert done.is_set()
    at = next(k for k, m in enumerate(sent) if any(e[0] == "finish" for _, evs in m[1] for e in evs))
    assert sent[at][2]["free_blocks"] < total       # the last tokens went out with the blocks still held
    assert sent[at + 1][1] == [] and sent[at + 1][2]["free_blocks"] == total   # then the counters, all free
    tokens = [e for m in sent for _, evs in m[1] for e in evs if e[0] == "token"]
    assert sorted(e[1] for e in tokens) == [0, 0, 0, 1, 1, 1]
    assert not engine.seqs
