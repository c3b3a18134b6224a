"""The embedded demo: the yellow-broccoli failure reproduced in a small synthetic world, and what
RecA does to it — end to end on a laptop CPU (`make demo`)."""
