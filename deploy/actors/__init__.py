"""Where a run's roles become Ray actors: the assembly of each role from the config, the learner
group, and the set of actors a run or an evaluation starts and stops together."""
