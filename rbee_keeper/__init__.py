"""rbee: the controller — hosts over SSH, placement, and `rbee infer`."""
