"""Everything distributed: the Horovod glue (the only module that imports horovod), synchronized batch norm,
elastic runs and preemption."""
