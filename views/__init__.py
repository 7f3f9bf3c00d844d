"""The tools' read model: what the topics and the orchestrators' state say, one view a module, each behind one face.
monitor.py, workflows.py, dead_letters.py, console.py and demo.py import it (and common, and the table), never each
other.

  flow       the topics read into a Flow: each workflow's moments, rates, duplicates, dead letters; one workflow's messages
  board      the Flow drawn for a terminal (rich)
  workflows  the orchestrators' state: each workflow as one object, found by id, why it is stuck
  requests   a person's cancel or retry, sent and its answer awaited
  letters    the dead letters, their originals, and their replay
  search     finding many: a filter, an index over the state, pages
  live       what the console keeps live: the topics tailed, the state followed, a page of workflows found
"""
