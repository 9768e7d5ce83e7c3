"""Tasks with known answers, for demos and tests of the whole method (see ``sepo.tasks.sentiment``)."""
