"""What training needs beyond one process's loop (train.py): training on many processes or hosts under
torchrun (distributed.py), the machine's facts that pick the precision (hardware.py), and the calibration
fitted after training (calibration.py)."""
