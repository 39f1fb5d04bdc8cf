"""The reference design both benchmarks compare against: the classic PyTorch-examples MNIST CNN.

Not part of mnist-k8s. `bench/train.py` trains it with the tutorial's recipe; `bench/serve.py` serves it the
way tutorials do.
"""
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    "conv 1->32 3x3, conv 32->64 3x3, max-pool 2, dropout 0.25, linear 9216->128, dropout 0.5, linear 128->10."

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        return F.log_softmax(self.fc2(x), dim=1)
