"""``lockstep run``: a group put back to one state before every failure case.

- :mod:`~lockstep.run.cases`: which cases, in which order;
- :mod:`~lockstep.run.execute`: one case as a process, its output stamped, its time limit;
- :mod:`~lockstep.run.results`: what a run found, as JSON and JUnit XML;
- :mod:`~lockstep.run.loop`: restore, run, collect, for every case; Ctrl-C puts the group back;
- :mod:`~lockstep.run.report`: the HTML report, a timeline picture per case.
"""
