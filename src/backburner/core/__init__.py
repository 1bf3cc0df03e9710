"""Pure domain logic: states, transitions, ids, retry policy, clock."""
