package proxy

import "syscall"

// socketState is what a non-consuming look at a socket finds.
type socketState int

const (
	socketIdle   socketState = iota // nothing to read, still open
	socketData                      // bytes are waiting
	socketClosed                    // the peer closed or reset it
)

// awaitReadable blocks, in the runtime's network poller, until the socket
// has bytes or is closed, or its read deadline passes (then socketIdle).
// Nothing is consumed, so a pipelined next request stays for the server.
func awaitReadable(rc syscall.RawConn) socketState {
	state := socketIdle
	err := rc.Read(func(fd uintptr) bool {
		state = peekFD(fd)
		return state != socketIdle
	})
	if err != nil {
		return socketIdle
	}
	return state
}
