#!/usr/bin/env python3
"""Cluster doctor (also installed as `hvd-pcdarts-doctor`): run it with the real job's launcher first.
    horovodrun --gloo -np 2 -H localhost:2 python bin/doctor.py --dataset digits
    mpirun -np 4 -H node0:2,node1:2 python bin/doctor.py --dataset cifar10 --data-dir data
"""
import sys

from hvd_pcdarts.commands import doctor

if __name__ == "__main__":
    sys.exit(doctor())
