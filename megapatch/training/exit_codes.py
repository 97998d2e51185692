"""Exit codes of ``megapatch train`` (and of every rank of it), for job scripts and sweeps.

=====  ==========  ==========================================================================
code   name        meaning
=====  ==========  ==========================================================================
0      FINISHED    the whole token budget was trained; the final checkpoint is written
75     STOPPED     stopped early (SIGTERM/SIGUSR1, ``--exit-duration-in-mins``,
                   ``--exit-interval``) after writing a complete checkpoint of the last
                   finished step: run the same command again (requeue the job) to continue
1      FAILED      the run failed (an exception, non-finite loss, a lost rank); the latest
                   complete checkpoint, if any, is still good
2      BAD_INPUT   refused before any work: a bad flag, config, data or checkpoint (the
                   message names it and the fix)
=====  ==========  ==========================================================================

75 is ``EX_TEMPFAIL`` of sysexits.h ("try again later").
"""

from __future__ import annotations

FINISHED = 0
FAILED = 1
BAD_INPUT = 2
STOPPED = 75

NAMES = {FINISHED: "finished", FAILED: "failed", BAD_INPUT: "bad input", STOPPED: "stopped"}
