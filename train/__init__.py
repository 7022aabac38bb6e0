"""rawdiff training side: data (synthetic camera, InvISP/FiveK protocol) and the training loop."""
