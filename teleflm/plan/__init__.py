"""Planning a run before renting it: the estimate (`teleflm plan`) and the simulation of its
layout on a fake process group (`teleflm plan --simulate`)."""
