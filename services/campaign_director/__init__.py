"""The Campaign Director daemon: the Common CD (singleton master) and the Zone Directors (one lease per zone)."""
