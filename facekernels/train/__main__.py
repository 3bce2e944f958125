from facekernels.train.cli import main

main()
