from flowtok_fast.cli import main

main()
