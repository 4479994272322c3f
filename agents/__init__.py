"""Stream logic: how records from the log become table updates."""
