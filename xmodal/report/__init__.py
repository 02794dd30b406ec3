"""Reports layer: run folders laid out as the methods' paper tables (:mod:`.runs`) and sweep folders
(:mod:`.sweeps`): tables, mean +- standard error over seeds, figures. Reads files only, never Ray."""
