//go:build !(linux || darwin || freebsd || netbsd || openbsd || dragonfly)

package handlers

const canPeek = false

func peekFD(uintptr) socketState { return socketIdle }
