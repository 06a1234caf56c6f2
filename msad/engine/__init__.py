"""Training: the trainers of train_net_T.py and train_net_S.py, their hooks, the frozen teacher."""
