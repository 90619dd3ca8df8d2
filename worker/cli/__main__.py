from tokenwarden.worker.cli import main

main()
